"""The Triton backend: generated modules rendered once per plan, cached on disk and imported (loader)."""

"""Backends that execute a Plan.

- ``torch`` (attngen.backends.torch_backend): every ordering in plain PyTorch ops, autograd through all
  of it. Fast enough on CPU, the fallback where no GPU is present, and a second, independent
  implementation that the generated kernels are checked against.
- ``triton`` (attngen.triton_backend): generated kernels for the linear ordering (attngen.codegen).
"""
BACKENDS = ("auto", "torch", "triton")

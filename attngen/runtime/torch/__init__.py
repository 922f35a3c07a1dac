"""The PyTorch backend: every exact ordering of a Plan in plain PyTorch ops (backend.run, run_state, step), on
any device; autograd differentiates all of it. A second, independent implementation that the generated
kernels are checked against."""

"""Conv-Basis (docs/conv_basis.md): the basis search by probing columns and softmax through the basis by FFT,
with its exact backward (execute)."""

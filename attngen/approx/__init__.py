"""Opt-in approximations, one folder each (declared under a spec's ``approx`` key, validated by
attngen.frontend.approx, checked and costed by the planning pass ``approximate``):
conv_basis (Conv-Basis: softmax through a recovered k-conv basis, applied by FFT) and topk_sparse
(SEA-style: exact softmax over the key blocks an estimator picks)."""

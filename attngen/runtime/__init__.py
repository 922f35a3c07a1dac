"""Running plans: the one input validator (inputs), the recurrent state (state), the sympy -> torch evaluator
(evaluate), the PyTorch backend (torch/) and the loader of generated Triton modules with their shared host
runtime (triton/)."""

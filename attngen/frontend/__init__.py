"""The frontend: spec text (YAML or a mapping) -> a validated Spec whose expressions come from the restricted
parser (expr: an ast whitelist to sympy, never eval) and whose approximation is validated (approx)."""

"""attngen: declare an attention variant in a few lines, get verified kernels."""
from .errors import AttngenError, InputError, PlanError, SpecError, VerificationError
from .spec import Spec, builtin_names, load_spec

__version__ = "0.1.0"
__all__ = ["AttngenError", "InputError", "PlanError", "SpecError", "VerificationError", "Spec",
           "builtin_names", "load_spec", "__version__", "compile", "AttentionOp", "reference"]


def __getattr__(name):
    """compile, AttentionOp and reference import torch: load them on first use, so that the compiler stages
    (spec, expr, rewrite, plan) import without torch."""
    if name in ("compile", "AttentionOp"):
        from . import runtime
        return getattr(runtime, name)
    if name == "reference":
        from .naive import reference
        return reference
    raise AttributeError(f"module 'attngen' has no attribute {name!r}")

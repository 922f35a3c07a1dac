"""attngen: declare an attention variant in a few lines, get verified kernels."""
from .errors import AttngenError, InputError, PlanError, SpecError, VerificationError
from .spec import Spec, builtin_names, load_spec
from .reference import reference
from .runtime import AttentionOp, compile

__version__ = "0.1.0"
__all__ = ["AttngenError", "InputError", "PlanError", "SpecError", "VerificationError", "Spec",
           "builtin_names", "load_spec", "__version__", "compile", "AttentionOp", "reference"]

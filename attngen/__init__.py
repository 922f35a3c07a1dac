"""attngen: declare an attention variant in a few lines, get verified kernels.

The compiler stages (frontend, passes, codegen, pipeline, build) import without torch; ``compile``,
``AttentionOp`` and ``reference`` load the torch runtime on first use (PEP 562 lazy attributes).
"""
import importlib

from attngen.errors import AttngenError, InputError, PlanError, SpecError, VerificationError
from attngen.frontend.spec import Spec, builtin_names, builtin_specs, load_spec, spec_modes
from attngen.version import __version__

__all__ = ["AttngenError", "InputError", "PlanError", "SpecError", "VerificationError", "Spec",
           "builtin_names", "builtin_specs", "spec_modes", "load_spec", "__version__", "compile", "AttentionOp",
           "reference"]

_LAZY = {"compile": "attngen.op", "AttentionOp": "attngen.op", "reference": "attngen.naive"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attngen' has no attribute {name!r}")

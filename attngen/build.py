"""`attngen build`: the generated modules of specs, written to a folder (generated/ for the built-ins).

The text written for a spec is exactly what attngen.compile(spec, backend="triton") imports: the lowering of
its plan for the Triton target (attngen.pipeline). This module does not import torch or triton.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from attngen import pipeline
from attngen.errors import PlanError
from attngen.frontend.spec import Spec, builtin_names, load_spec


@dataclass(frozen=True)
class Module:
    spec: Spec
    source: str | None  # None: no Triton template for this plan
    reason: str = ""  # why not, when source is None
    orderings: tuple = ()  # the orderings whose kernels the module holds (it dispatches when there are two)

    @property
    def filename(self) -> str:
        return f"{self.spec.name}_{self.spec.mode}.py"


def generate(spec: Spec) -> Module:
    """Render ``spec``'s Triton module, or say why its plan has no template."""
    try:
        plan = pipeline.plan(spec, target="triton")
        source = pipeline.lower(plan)
    except PlanError as exc:
        return Module(spec, None, str(exc))
    return Module(spec, source, orderings=plan.capabilities.kernels)


def builtin_modules() -> list:
    """Every built-in spec in both modes, rendered (or with the reason it is not)."""
    return [generate(load_spec(name, causal=causal)) for name in builtin_names() for causal in (True, False)]


def write(module: Module, folder: Path) -> Path:
    """Write the module atomically (temporary file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / module.filename
    fd, tmp = tempfile.mkstemp(prefix=f".{module.filename}.", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
        f.write(module.source)
    os.replace(tmp, path)
    return path

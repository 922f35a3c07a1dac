"""`attngen build`: the generated modules of specs, written to a folder (generated/ for the built-ins).

The text written for a spec is exactly what attngen.compile(spec, backend="triton") imports: the lowering of
its plan for the Triton target (attngen.pipeline). This module does not import torch or triton.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from attngen import pipeline
from attngen.errors import InputError, PlanError
from attngen.frontend.spec import Spec, builtin_specs


@dataclass(frozen=True)
class Module:
    spec: Spec
    source: str | None  # None: no Triton template for this plan
    reason: str = ""  # why not, when source is None
    orderings: tuple = ()  # the orderings whose kernels the module holds (it dispatches when there are two)
    parts: tuple = ()  # a spec with terms: its terms' modules (the spec itself has no module: the op combines them)

    @property
    def filename(self) -> str:
        return f"{self.spec.name}_{self.spec.mode}.py"


def generate(spec: Spec, force=None) -> Module:
    """Render ``spec``'s Triton module, or say why its plan has no template (a spec with terms: its terms' modules,
    in ``parts``). ``force`` names an ordering: the module then holds only that ordering's kernels, the module
    ``attngen.compile(spec, backend="triton", plan=force)`` imports."""
    if spec.terms:
        parts = tuple(generate(t.spec, force) for t in spec.terms)
        return Module(spec, None, "; ".join(f"{m.spec.name}: {m.reason}" for m in parts if m.source is None),
                      parts=parts)
    try:
        plan = pipeline.plan(spec, target="triton", force=force)
        source = pipeline.lower(plan)
    except PlanError as exc:
        return Module(spec, None, str(exc))
    return Module(spec, source, orderings=plan.capabilities.kernels)


def builtin_modules() -> list:
    """Every built-in spec in both modes (the causal one only for a gated spec), rendered (or with the reason it is
    not)."""
    return [generate(spec) for spec in builtin_specs()]


def write(module: Module, folder: Path) -> Path:
    """Write the module atomically (temporary file, then rename)."""
    return write_bytes(Path(folder) / module.filename, module.source.encode("utf-8"))


HOST_PACKAGE = "attngen_host"
# the shared host runtime and what it imports, as (package, file) -> path under <folder>/attngen_host: the same
# relative layout as in attngen, so their relative imports (from ..validate, from ...errors) resolve there too
HOST_FILES = {
    ("attngen", "errors.py"): "errors.py",
    ("attngen.runtime", "validate.py"): "runtime/validate.py",
    ("attngen.runtime.triton", "host.py"): "runtime/triton/host.py",
}
HOST_INITS = ("__init__.py", "runtime/__init__.py", "runtime/triton/__init__.py")  # empty


def write_host(folder: Path) -> list:
    """Write the generated modules' shared host runtime into ``folder``/attngen_host (the files of HOST_FILES and
    empty __init__.py files), for modules that run without attngen installed: they import
    attngen_host.runtime.triton.host when attngen.runtime.triton.host is not importable. Returns the paths."""
    root = Path(folder) / HOST_PACKAGE
    written = [write_bytes(root / init, b"") for init in HOST_INITS]
    for (package, name), target in HOST_FILES.items():
        written.append(write_bytes(root / target, resources.files(package).joinpath(name).read_bytes()))
    return written


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, then os.replace), with the
    permissions a plain open() would give (0666 less the umask; mkstemp's 0600 would hide the file from
    other users of a shared cache or checkout). InputError when the folder cannot hold it."""
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: expected a folder to write {path.name} into, found a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise InputError(f"{folder}: cannot write {path.name} there ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then restore at once
    os.umask(mask)
    return mask

"""The Triton backend: render a plan's module once, cache it on disk, import it, and run it.

The cache key is the spec hash plus the template hash, so editing a template or a spec gives a new
file and a stale module is never imported. Files are written to a temporary name and moved into place
with os.replace, so concurrent processes never import a half-written module.

A module holds its kernels, its record (MODULE) and thin public functions; the host code they call is
attngen.runtime.triton.host, imported by every module, so editing the host changes no file and no cache key.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

from attngen import pipeline
from attngen.build import write_bytes
from attngen.codegen.module import module_name, module_tag
from attngen.codegen.render import template_hash
from attngen.errors import PlanError

_LOCK = threading.Lock()
_MODULES: dict = {}  # cache key -> imported module


def cache_dir() -> Path:
    """$ATTNGEN_CACHE_DIR, else $XDG_CACHE_HOME/attngen, else ~/.cache/attngen."""
    root = os.environ.get("ATTNGEN_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attngen"


def cache_key(plan) -> str:
    """The module's file name: spec, mode, the orderings it holds (l, q, lq), spec hash, template hash."""
    tag = module_tag(plan.capabilities.kernels)
    return f"{module_name(plan)}_{tag}_{plan.spec.hash}_{template_hash()}"


def load_module(plan):
    """The imported generated module of ``plan`` (rendered and written on first use; kept in plan.memo, so that a
    call, or a torch.compile trace of one, finds it with no file or hash work once attngen.compile has loaded it)."""
    module = plan.memo.get("triton_module")
    if module is None:
        module = plan.memo["triton_module"] = _load(plan)
    return module


def _load(plan):
    key = cache_key(plan)
    with _LOCK:
        if key in _MODULES:
            return _MODULES[key]
        source = pipeline.lower(plan)
        path = _write(key, source)
        module = _import(key, path)
        _MODULES[key] = module
        return module


def function(plan):
    """The public ``<name>_attention`` function of ``plan``'s module."""
    module = load_module(plan)
    return getattr(module, f"{plan.spec.name}_attention")


def run(plan, q, k, v, params: dict | None = None, *, layout: str = "bhtd", initial_state=None,
        return_state: bool = False, cu_seqlens=None):
    """o for q, k, v ([B, H, T, D] for layout 'bhtd') with the spec's parameters ``params`` (by name);
    ``(o, (S, z, pos))`` with ``return_state``. ``initial_state`` is a tuple (S, z, pos) (z None without
    row sums) and ``cu_seqlens`` packs sequences along T (B = 1): causal plans only (the module says why not).
    A module with both orderings runs the quadratic one for key lengths below the plan's crossover (states and
    packed sequences always run the linear one)."""
    params = _checked(plan, params)
    module = load_module(plan)
    if hasattr(module, "CROSSOVER"):  # both orderings: dispatch at this plan's (head dim's) crossover
        params["crossover"] = plan.choice.dispatch_length(plan.spec.where)
    return getattr(module, f"{plan.spec.name}_attention")(q, k, v, initial_state=initial_state,
                                                           return_state=return_state, cu_seqlens=cu_seqlens,
                                                           layout=layout, **params)


def run_lse(plan, q, k, v, params: dict | None = None, *, layout: str = "bhtd"):
    """(o, lse) of a softmax plan's flash kernels: lse [B, H, T] fp32 the log row sum, differentiable
    (host.attention_lse of the module's own host: a standalone module's too)."""
    params = _checked(plan, params)
    module = load_module(plan)
    return module.host.attention_lse(module.MODULE, q, k, v, layout, params)


def step(plan, q_t, k_t, v_t, state, params: dict | None = None, layout: str = "bhtd"):
    """One decode step: (o_t, (S, z, pos)) for tokens [B, H, 1, D] ('bhtd') and a state tuple (S, z, pos)."""
    params = _checked(plan, params)
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise PlanError(f"{plan.spec.name}: step expects the state as a tuple (S, z, pos), found "
                        f"{type(state).__name__}")
    module = load_module(plan)
    o, S, z, pos = getattr(module, f"{plan.spec.name}_step")(q_t, k_t, v_t, *state, layout=layout, **params)
    return o, (S, z, pos)


def _checked(plan, params: dict | None) -> dict:
    params = dict(params or {})
    pro = plan.prologue
    spec = pro.spec if pro is not None and pro.fused else plan.spec  # fused feature maps: every spec parameter
    unknown = set(params) - set(spec.param_names) - set(spec.gate_names)
    if unknown:
        raise PlanError(f"{spec.name}: unknown parameter(s) {sorted(unknown)}; "
                        f"expected {list(spec.param_names) or 'none'}")
    return params


def _write(key: str, source: str) -> Path:
    path = cache_dir() / f"{key}.py"
    data = source.encode()
    if path.is_file() and hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
        return path
    return write_bytes(path, data)


def _import(key: str, path: Path):
    name = f"attngen_generated.{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton.jit reads its functions' source through the module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module

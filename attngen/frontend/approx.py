"""Opt-in approximations, declared under a spec's ``approx`` key (docs/specs.md, docs/conv_basis.md,
docs/sparse.md).

    approx: {kind: conv_basis, k: 8, probe: 16, delta: 1e-3, search: binary}
    approx: {kind: topk_sparse, estimator: cosformer, block: 64, k: 4,
             always_keep: {diagonal: true, first: 1}}

This module validates the mapping's structure (types and ranges) into frozen dataclasses. What needs the
plan (conv_basis only for causal softmax, topk_sparse only for the softmax family, a separable estimator)
is checked by the planner's ``approximate`` pass; what needs the inputs (a probe longer than the
sequence) by the runtime. A topk_sparse estimator is itself a spec: a built-in name or an inline mapping,
loaded in the mode of the spec that declares it.
"""
from __future__ import annotations

from dataclasses import dataclass

from attngen.errors import SpecError
from attngen.frontend.expr import brief

KINDS = ("conv_basis", "topk_sparse")
SEARCHES = ("binary", "scan")
MIN_BLOCK = 16


@dataclass(frozen=True)
class ConvBasis:
    """Conv-Basis (Gu et al. 2024; docs/variants.md, "Conv-Basis"): a k-conv basis of the masked scaled scores,
    recovered by probing columns."""
    k: int  # basis size (number of convolutions)
    probe: int = 16  # probe length p: the head h(c) = H[c : c + p, c] compared between columns
    delta: float = 1e-3  # l1 distance between heads that starts a new basis element
    search: str = "binary"  # binary (the paper's, under its non-degeneracy assumption) or scan (safe)
    kind: str = "conv_basis"


@dataclass(frozen=True)
class AlwaysKeep:
    diagonal: bool = True  # the query block's own key block
    first: int = 1  # this many first key blocks (attention sinks)


@dataclass(frozen=True)
class TopkSparse:
    """SEA-style sparse attention: top-k key blocks per query block, scored by a separable estimator."""
    estimator: object  # attngen.spec.Spec (separable; the planner checks)
    k: int  # key blocks chosen per query block, besides the always-kept ones
    block: int = 64  # block size (query and key), a power of two >= 16
    always_keep: AlwaysKeep = AlwaysKeep()
    kind: str = "topk_sparse"


def parse_approx(raw, causal: bool, where: str, load, builtins):
    """The validated approximation of a spec's ``approx`` mapping (None when absent). ``load(source,
    causal=...)`` loads an estimator spec (attngen.frontend.spec.load_spec) and ``builtins()`` lists the
    built-in names: passed in by the spec loader, which imports this module."""
    if raw is None:
        return None
    key = "approx"
    if not isinstance(raw, dict):
        raise SpecError(f"found {brief(raw)}", where=where, key=key,
                        expected="a mapping such as {kind: conv_basis, k: 8} or {kind: topk_sparse, "
                                 "estimator: cosformer, k: 4}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise SpecError(f"kind {brief(kind, 40)}", where=where, key=f"{key}.kind", expected=" or ".join(KINDS))
    if kind == "conv_basis":
        return _conv_basis(raw, causal, where)
    return _topk_sparse(raw, causal, where, load, builtins)


def _fields(raw: dict, allowed: tuple, where: str):
    extra = sorted(k if isinstance(k, str) else brief(k, 40) for k in raw if k not in allowed)[:8]
    if extra:
        raise SpecError(f"unknown key(s) {extra}", where=where, key="approx", expected=", ".join(allowed))


def _int(raw: dict, name: str, where: str, default=None, minimum: int = 1, prefix: str = "approx") -> int:
    value = raw.get(name, default)
    if value is None:
        raise SpecError(f"missing '{name}'", where=where, key=prefix,
                        fix=f"add {name}: <an integer >= {minimum}>")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} = {brief(value, 40)}", where=where, key=f"{prefix}.{name}",
                        expected=f"an integer >= {minimum}")
    return value


def _conv_basis(raw: dict, causal: bool, where: str) -> ConvBasis:
    _fields(raw, ("kind", "k", "probe", "delta", "search"), where)
    if not causal:
        raise SpecError("conv_basis needs a causal spec (the basis is of lower-triangular score matrices)",
                        where=where, key="approx.kind",
                        fix="use causal: true, or drop approx for the bidirectional mode "
                            "(approx: {causal: {...}, bidirectional: null})")
    k = _int(raw, "k", where)
    probe = _int(raw, "probe", where, ConvBasis.probe)
    delta = raw.get("delta", ConvBasis.delta)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0 or delta == float("inf"):
        raise SpecError(f"delta = {brief(delta, 40)}", where=where, key="approx.delta",
                        expected="a finite number > 0 (the l1 distance between column heads that starts a "
                                 "new basis element)")
    search = raw.get("search", ConvBasis.search)
    if search not in SEARCHES:
        raise SpecError(f"search = {brief(search, 40)}", where=where, key="approx.search",
                        expected=" or ".join(SEARCHES))
    return ConvBasis(k, probe, float(delta), search)


def _topk_sparse(raw: dict, causal: bool, where: str, load, builtins) -> TopkSparse:
    _fields(raw, ("kind", "estimator", "k", "block", "always_keep"), where)
    k = _int(raw, "k", where)
    block = _int(raw, "block", where, TopkSparse.block, MIN_BLOCK)
    if block & (block - 1):
        raise SpecError(f"block = {block}", where=where, key="approx.block",
                        expected=f"a power of two >= {MIN_BLOCK} (16, 32, 64, 128)")
    keep = raw.get("always_keep", {})
    if keep is None:
        keep = {}
    if not isinstance(keep, dict) or any(k not in ("diagonal", "first") for k in keep):
        raise SpecError(f"always_keep = {brief(keep, 60)}", where=where, key="approx.always_keep",
                        expected="a mapping {diagonal: true|false, first: <key blocks, >= 0>}")
    diagonal = keep.get("diagonal", AlwaysKeep.diagonal)
    if not isinstance(diagonal, bool):
        raise SpecError(f"diagonal = {brief(diagonal, 40)}", where=where, key="approx.always_keep.diagonal",
                        expected="true or false")
    first = _int(keep, "first", where, AlwaysKeep.first, 0, "approx.always_keep")
    if "estimator" not in raw:
        raise SpecError("missing 'estimator'", where=where, key="approx",
                        fix="add estimator: <a built-in separable spec such as cosformer, or an inline spec>")
    estimator = _estimator(raw["estimator"], causal, where, load, builtins)
    return TopkSparse(estimator, k, block, AlwaysKeep(diagonal, first))


def _estimator(raw, causal: bool, where: str, load_spec, builtin_names):
    if isinstance(raw, str):
        if raw not in builtin_names():
            raise SpecError(f"estimator {brief(raw, 60)} is not a built-in spec", where=where,
                            key="approx.estimator",
                            expected="one of " + ", ".join(builtin_names()) + ", or an inline spec mapping")
        return load_spec(raw, causal=causal)
    if isinstance(raw, dict):
        if "approx" in raw:
            raise SpecError("an estimator cannot itself declare approx", where=where, key="approx.estimator")
        data = {"name": "estimator", **raw, "causal": causal}
        try:
            return load_spec(data)
        except SpecError as exc:  # say where the inline spec sits
            raise SpecError(str(exc).replace("<dict>", "inline spec", 1), where=where,
                            key="approx.estimator") from None
    raise SpecError(f"estimator = {brief(raw, 60)}", where=where, key="approx.estimator",
                    expected="a built-in spec name or an inline spec mapping")

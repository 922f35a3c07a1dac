"""Specs: loading (YAML file, built-in name, or Python dict), validation, and the frozen Spec.

A spec declares one attention variant (docs/specs.md documents every key):

    name: cosformer
    causal: true
    similarity: dot(relu(q), relu(k))
    reweight: cos(pi/2*(i-j)/M)
    normalize: {kind: rowsum, eps: 1e-6, eps_mode: clamp}
    constants: {M: max(n_q, n_k)}

Any expression key may hold ``{causal: ..., bidirectional: ...}``; the mode picks the branch.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from importlib import resources

import sympy
import yaml

from attngen.frontend.approx import parse_approx
from attngen.errors import SpecError
from attngen.frontend.expr import BUILTIN_SYMBOLS, I, J, Context, brief, parse_expression

KEYS = ("name", "description", "causal", "similarity", "reweight", "normalize", "constants",
        "parameters", "approx")
NORMALIZE_KINDS = ("none", "rowsum", "softmax")
EPS_MODES = ("add", "clamp")
MODES = ("causal", "bidirectional")
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MAX_YAML_DEPTH = 100
RESERVED = set(BUILTIN_SYMBOLS) | {"q", "k", "pi", "dot", "norm", "relu", "elu", "exp", "log", "sigmoid",
                                   "tanh", "abs", "sqrt", "sin", "cos", "min", "max"}


@dataclass(frozen=True)
class Normalize:
    """Row normalisation: none, rowsum (with eps added or clamped), or softmax."""
    kind: str = "none"
    eps: float = 0.0
    eps_mode: str = "add"


@dataclass(frozen=True)
class Parameter:
    """A learnable tensor: shape () (scalar) or ('H',) (per head); init is an expression in h, H."""
    name: str
    shape: tuple
    init: str
    init_expr: sympy.Expr = field(compare=False)
    symbol: sympy.Symbol = field(compare=False)


@dataclass(frozen=True)
class Constant:
    """A named constant: a number or an expression in n_q, n_k, d, h, H and earlier constants."""
    name: str
    source: str
    expr: sympy.Expr = field(compare=False)  # as written, may reference other constants
    symbol: sympy.Symbol = field(compare=False)


@dataclass(frozen=True)
class Spec:
    """A validated spec for one mode (causal or bidirectional). Expressions are parsed sympy trees."""
    name: str
    description: str
    causal: bool
    similarity: str
    reweight: str
    normalize: Normalize
    constants: tuple  # of Constant, in declaration order
    parameters: tuple  # of Parameter
    approx: str  # canonical JSON of the approx mapping of this mode ('null' if absent); hashed
    where: str = field(compare=False)  # the file (or '<dict>') it came from, for errors; not its content
    similarity_expr: sympy.Expr = field(compare=False)
    reweight_expr: sympy.Expr = field(compare=False)
    approximation: object = field(compare=False, default=None)  # attngen.approx.ConvBasis | TopkSparse | None

    @property
    def mode(self) -> str:
        return "causal" if self.causal else "bidirectional"

    @property
    def param_names(self) -> tuple:
        return tuple(p.name for p in self.parameters)

    def canonical(self) -> dict:
        """The spec as plain data (what its hash covers)."""
        return {
            "name": self.name, "causal": self.causal, "similarity": self.similarity,
            "reweight": self.reweight,
            "normalize": [self.normalize.kind, self.normalize.eps, self.normalize.eps_mode],
            "constants": [[c.name, c.source] for c in self.constants],
            "parameters": [[p.name, list(p.shape), p.init] for p in self.parameters],
            "approx": self.approx,
        }

    @property
    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def constant_values(self) -> dict:
        """Constants substituted down to builtin symbols: {Symbol: expr in n_q, n_k, d, h, H}."""
        out = {}
        for c in self.constants:
            out[c.symbol] = c.expr.xreplace(out)
        return out

    def to_yaml(self) -> str:
        """The resolved spec (this mode only) as YAML; load_spec of it gives an equal Spec."""
        data = {"name": self.name, "description": self.description, "causal": self.causal,
                "similarity": self.similarity, "reweight": self.reweight,
                "normalize": self.normalize.kind}
        if self.normalize.kind == "rowsum":  # eps is refused for the other kinds, so it is written only here
            data["normalize"] = {"kind": "rowsum", "eps": self.normalize.eps, "eps_mode": self.normalize.eps_mode}
        if self.constants:
            data["constants"] = {c.name: c.source for c in self.constants}
        if self.parameters:
            data["parameters"] = {p.name: {"shape": list(p.shape), "init": p.init} for p in self.parameters}
        if self.approx != "null":
            data["approx"] = json.loads(self.approx)
        return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------------------------------
def spec_files() -> list:
    """The built-in specs shipped in the package (attngen/specs/*.yaml), as paths."""
    folder = Path(str(resources.files("attngen").joinpath("specs")))
    return sorted(folder.glob("*.yaml"))


def builtin_names() -> list:
    """Names of the built-in specs shipped with attngen."""
    return sorted(p.stem for p in spec_files())


def load_spec(source, **overrides) -> Spec:
    """Load a spec from a YAML path, a built-in name (``"cosformer"``), a YAML string, or a dict.

    ``overrides`` replace top-level keys or constants: ``load_spec("cosformer", causal=False, M=4096)``.
    Raises SpecError with the file, key, what was found and how to fix it.
    """
    if isinstance(source, Spec):
        data, where = yaml.safe_load(source.to_yaml()), source.where
    elif isinstance(source, dict):
        data, where = dict(source), "<dict>"
    elif isinstance(source, (str, Path)):
        data, where = _read(source)
    else:
        raise SpecError(f"cannot load a spec from {type(source).__name__}",
                        expected="a path, a built-in name, or a dict")
    return build_spec(data, where, overrides)


def _key(k) -> str:
    """A mapping key as text (keys of a Python dict may be any hashable, e.g. a 5000-digit int)."""
    return k if isinstance(k, str) else brief(k)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _read(source) -> tuple:
    text = str(source)
    if not text.strip():
        raise SpecError("the spec source is empty", where="<empty>",
                        expected="a YAML file path, a built-in name, YAML text or a dict")
    path = Path(text)
    builtin = {p.stem: p for p in spec_files()}
    if "\n" not in text and not _exists(path) and text in builtin:
        path = builtin[text]
        source = f"{text} (built-in {path.name})"
    if "\n" not in text and path.suffix in (".yaml", ".yml", "") and not _exists(path):
        raise SpecError(f"no spec file or built-in spec named {brief(text, 200)}",
                        where=text, expected="a YAML file path or one of " + ", ".join(sorted(builtin)),
                        fix="check the path, or run 'attngen list' for the built-in names")
    where = str(source) if "\n" not in text else "<yaml string>"
    try:
        raw = path.read_text() if "\n" not in text else text
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path, or text that is not UTF-8
        raise SpecError(f"cannot read the file: {str(exc)[:200]}", where=where) from None
    if _flow_depth(raw) > MAX_YAML_DEPTH:  # PyYAML needs ~1 s to reach its RecursionError on such input
        raise SpecError(f"YAML is nested more than {MAX_YAML_DEPTH} levels deep", where=where)
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"invalid YAML{at}: {getattr(exc, 'problem', exc)}", where=where) from None
    except RecursionError:
        raise SpecError("YAML is nested too deeply", where=where) from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's int-to-str digit limit
        raise SpecError(f"invalid YAML: {str(exc)[:120]}", where=where) from None
    if not isinstance(data, dict):
        raise SpecError(f"the document is a {type(data).__name__}", where=where,
                        expected="a mapping with keys " + ", ".join(KEYS))
    return data, where


def _flow_depth(text: str) -> int:
    """The deepest nesting of [ and { in ``text`` (quotes ignored: an upper bound is all that is needed)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}" and depth:
            depth -= 1
    return deepest


def _pick_mode(value, causal: bool, where: str, key: str):
    """Resolve a ``{causal: ..., bidirectional: ...}`` mapping to the branch of the mode."""
    if isinstance(value, dict) and set(value) & set(MODES):
        extra = set(map(_key, value)) - set(MODES)
        if extra:
            raise SpecError(f"mode mapping has unknown keys {sorted(extra)}", where=where, key=key,
                            expected="only 'causal' and 'bidirectional'")
        mode = "causal" if causal else "bidirectional"
        if mode not in value:
            raise SpecError(f"no branch for the {mode} mode", where=where, key=key,
                            fix=f"add '{mode}: ...' to the mapping")
        return value[mode]
    return value


def _check_name(name, where, key):
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(f"invalid name {brief(name)}", where=where, key=key,
                        expected="an identifier such as 'gamma' or 'M'")
    if name in RESERVED:
        raise SpecError(f"{name!r} is a reserved name", where=where, key=key,
                        fix="choose another name (reserved: " + ", ".join(sorted(RESERVED)) + ")")


def build_spec(data: dict, where: str, overrides: dict | None = None) -> Spec:
    """Validate the mapping ``data`` (+ overrides) and build the Spec for its mode."""
    data = {_key(k): v for k, v in data.items()}
    overrides = dict(overrides or {})
    unknown = set(data) - set(KEYS)
    if unknown:
        raise SpecError(f"unknown key(s) {sorted(unknown)}", where=where,
                        expected="keys among " + ", ".join(KEYS), fix="check the spelling (docs/specs.md)")
    for key in ("causal", "name", "description", "similarity", "reweight", "normalize", "approx"):
        if key in overrides:
            data[key] = overrides.pop(key)

    causal = data.get("causal", True)
    if not isinstance(causal, bool):
        raise SpecError(f"found {brief(causal, 40)}", where=where, key="causal", expected="true or false")
    name = data.get("name")
    if name is None and where not in ("<dict>", "<yaml string>"):
        name = Path(where).stem
    _check_name(name, where, "name")
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        raise SpecError("description must be text", where=where, key="description")

    constants = _constants(data.get("constants") or {}, overrides, causal, where)
    parameters = _parameters(data.get("parameters") or {}, causal, where, {c.name for c in constants})
    names = {c.name: c.symbol for c in constants} | {p.name: p.symbol for p in parameters}

    scalar_names = {k: v for k, v in BUILTIN_SYMBOLS.items() if k not in ("i", "j")} | names
    if "similarity" not in data:
        raise SpecError("missing key 'similarity'", where=where, expected="e.g. similarity: dot(q, k)")
    similarity = _pick_mode(data["similarity"], causal, where, "similarity")
    sim_ctx = Context(where, "similarity", scalar_names, True,
                      {"i": "positions belong in 'reweight'", "j": "positions belong in 'reweight'"})
    sim_expr = parse_expression(similarity, sim_ctx)

    reweight = _pick_mode(data.get("reweight", 1), causal, where, "reweight")
    if reweight is None:
        reweight = 1
    rw_ctx = Context(where, "reweight", dict(BUILTIN_SYMBOLS) | names, False,
                     {"q": "the reweighting depends on positions only; put q, k in 'similarity'",
                      "k": "the reweighting depends on positions only; put q, k in 'similarity'"})
    rw_expr = parse_expression(reweight, rw_ctx)

    normalize = _normalize(_pick_mode(data.get("normalize", "none"), causal, where, "normalize"), where)
    approx = _pick_mode(data.get("approx"), causal, where, "approx")
    approximation = parse_approx(approx, causal, where, load_spec, builtin_names)  # refused before json.dumps (aliased YAML could hang it)
    try:
        approx_json = json.dumps(approx, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SpecError(f"approx is not plain data: {exc}", where=where, key="approx") from None
    return Spec(name=name, description=description.strip(), causal=causal, similarity=str(similarity),
                reweight=str(reweight), normalize=normalize, constants=tuple(constants),
                parameters=tuple(parameters), approx=approx_json, where=where,
                similarity_expr=sim_expr, reweight_expr=rw_expr, approximation=approximation)


def _constants(raw, overrides: dict, causal: bool, where: str) -> list:
    if not isinstance(raw, dict):
        raise SpecError(f"found {type(raw).__name__}", where=where, key="constants",
                        expected="a mapping name -> number or expression, e.g. {M: max(n_q, n_k)}")
    raw = {_key(k): _pick_mode(v, causal, where, f"constants.{_key(k)}") for k, v in raw.items()}
    unknown = set(overrides) - set(raw)
    if unknown:
        raise SpecError(f"unknown override(s) {sorted(unknown)}", where=where,
                        expected="a top-level key (" + ", ".join(KEYS) + ") or a declared constant ("
                        + (", ".join(raw) or "none") + ")")
    raw |= overrides
    out, known = [], {}
    for name, value in raw.items():
        _check_name(name, where, f"constants.{name}")
        sym = sympy.Symbol(name, real=True)
        ctx = Context(where, f"constants.{name}",
                      {k: v for k, v in BUILTIN_SYMBOLS.items() if k not in ("i", "j")} | known, False,
                      {"i": "constants cannot depend on positions", "j": "constants cannot depend on positions",
                       **{n: "a constant may only use constants declared before it" for n in raw if n not in known}})
        if isinstance(value, bool):
            raise SpecError(f"found {value!r}", where=where, key=f"constants.{name}", expected="a number or expression")
        expr = parse_expression(value, ctx)
        source = value if isinstance(value, str) else repr(value)  # after parsing: repr is safe now
        out.append(Constant(name, source, expr, sym))
        known[name] = sym
    return out


def _parameters(raw, causal: bool, where: str, taken: set) -> list:
    if isinstance(raw, list):  # also accept a list of {name, shape, init}
        items = {}
        for n, item in enumerate(raw):
            if not isinstance(item, dict) or "name" not in item:
                raise SpecError(f"item {n} is not a mapping with a 'name'", where=where, key="parameters")
            _check_name(item["name"], where, f"parameters[{n}].name")
            items[item["name"]] = {k: v for k, v in item.items() if k != "name"}
        raw = items
    if not isinstance(raw, dict):
        raise SpecError(f"found {type(raw).__name__}", where=where, key="parameters",
                        expected="a mapping name -> {shape: [H] or [], init: expression}")
    out = []
    for name, body in raw.items():
        key = f"parameters.{_key(name)}"
        _check_name(name, where, key)
        if name in taken:
            raise SpecError(f"{name!r} is both a constant and a parameter", where=where, key=key)
        if not isinstance(body, dict):
            body = {"init": body}
        extra = set(map(_key, body)) - {"shape", "init"}
        if extra:
            raise SpecError(f"unknown key(s) {sorted(extra)}", where=where, key=key, expected="shape, init")
        shape = body.get("shape", ["H"])
        if shape in ([], (), None, "scalar"):
            shape = ()
        elif shape in (["H"], ("H",), "H", "[H]"):
            shape = ("H",)
        else:
            raise SpecError(f"shape {brief(shape, 40)}", where=where, key=f"{key}.shape",
                            expected="[H] (one value per head) or [] (a scalar)")
        if "init" not in body:
            raise SpecError("missing 'init'", where=where, key=key, fix="add e.g. init: 0.5")
        init = _pick_mode(body["init"], causal, where, f"{key}.init")
        ctx = Context(where, f"{key}.init", {"h": BUILTIN_SYMBOLS["h"], "H": BUILTIN_SYMBOLS["H"],
                                              "d": BUILTIN_SYMBOLS["d"]}, False, {})
        if isinstance(init, bool):
            raise SpecError(f"found {init!r}", where=where, key=f"{key}.init", expected="a number or expression")
        init_expr = parse_expression(init, ctx)
        if shape == () and init_expr.has(BUILTIN_SYMBOLS["h"]):
            raise SpecError("a scalar parameter's init uses the head index h", where=where, key=f"{key}.init",
                            fix="declare shape: [H] for a per-head parameter")
        out.append(Parameter(name, shape, init if isinstance(init, str) else repr(init), init_expr,
                             sympy.Symbol(name, real=True)))
    return out


def _normalize(raw, where: str) -> Normalize:
    key = "normalize"
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, dict):
        raise SpecError(f"found {brief(raw)}", where=where, key=key,
                        expected="none, rowsum, softmax, or {kind: rowsum, eps: 1e-6, eps_mode: add|clamp}")
    extra = set(map(_key, raw)) - {"kind", "eps", "eps_mode"}
    if extra:
        raise SpecError(f"unknown key(s) {sorted(extra)}", where=where, key=key, expected="kind, eps, eps_mode")
    kind = raw.get("kind", "none")
    if kind not in NORMALIZE_KINDS:
        raise SpecError(f"unknown kind {brief(kind, 40)}", where=where, key=f"{key}.kind",
                        expected=" or ".join(NORMALIZE_KINDS))
    eps = raw.get("eps", 0.0)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < 1e3):
        raise SpecError(f"eps {brief(eps, 40)}", where=where, key=f"{key}.eps", expected="a number in [0, 1000)")
    mode = raw.get("eps_mode", "add")
    if mode not in EPS_MODES:
        raise SpecError(f"eps_mode {brief(mode, 40)}", where=where, key=f"{key}.eps_mode", expected="add or clamp")
    if kind != "rowsum" and ("eps" in raw or "eps_mode" in raw):
        raise SpecError(f"eps is only meaningful with kind rowsum, not {kind}", where=where, key=key)
    return Normalize(kind, float(eps), mode)


POSITION_SYMBOLS = (I, J)

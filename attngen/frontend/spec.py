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

import difflib
import functools
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import sympy
import yaml

from attngen.errors import SpecError
from attngen.frontend.approx import parse_approx
from attngen.frontend.expr import (
    BUILTIN_SYMBOLS,
    MAX_CALL_DEPTH,
    MAX_INTEGER_POWER,
    MAX_NODES,
    MAX_SYMBOLIC_POWER,
    TABLE_CALLS,
    VECTOR_CALLS,
    Context,
    Elem,
    I,
    J,
    Matrix,
    NotFinite,
    OutOfRange,
    Table,
    brief,
    call_depth,
    expanded_terms,
    largest_integer_power,
    numeric_value,
    parse_expression,
    parse_value,
    substitute,
    tensor_degree,
    tree_size,
    trig_terms,
)

KEYS = ("name", "description", "causal", "similarity", "reweight", "normalize", "constants",
        "parameters", "gates", "rotary", "approx", "max_length", "window", "terms")
TERM_KEYS = ("similarity", "reweight", "normalize", "window", "coefficient", "slice")  # the keys of one term
TERM_SHARED = ("causal", "description", "constants", "parameters", "gates", "rotary", "max_length")  # every term's
MAX_SPEC_TERMS = 8
GATE_KINDS = ("head", "key_dim")  # a gate per head [B, H, T], or per head and key dimension [B, H, T, Dk]
SCALE = "scale"  # the per-call score scale: op(q, k, v, scale=...), default 1/sqrt(d)
DEFAULT_SCALE = "1/sqrt(d)"
MAX_GATES = 1
DEFAULT_THETA = 10000.0
NORMALIZE_KINDS = ("none", "rowsum", "softmax")
EPS_MODES = ("add", "clamp")
MODES = ("causal", "bidirectional")
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # matched with fullmatch: '$' would accept a trailing newline
SUFFIXES = (".yaml", ".yml")
# Limits on the size of a spec (untrusted input), each refused with a SpecError
MAX_NAME = 64  # characters of a spec, constant or parameter name
MAX_SPEC_BYTES = 64 * 1024  # YAML text or file
MAX_YAML_DEPTH = 100  # nesting of [ and {
MAX_ENTRIES = 64  # constants, parameters, keys of any one mapping, items of any one list
MAX_PLAIN_NODES = 10_000  # values in the approx mapping (hashed as JSON)
MAX_CONSTANT_DEPTH = 32  # a constant using a constant using ... (the chain of references)
MAX_SUBSTITUTED_NODES = 4 * MAX_NODES  # nodes of an expression once the constants are substituted
MAX_TERMS = 256  # terms of the planner's expansion of the similarity and the reweight (expanded_terms)
MAX_TRIG_TERMS = 4  # terms in the arguments of sin, cos, tanh of the reweight, in all (trig_terms)
# names a spec may not take (the language of round 1; kept, so no spec name that loaded before is refused now)
SPEC_NAME_RESERVED = set(BUILTIN_SYMBOLS) | {"q", "k", "pi", "dot", "norm", "relu", "elu", "exp", "log", "sigmoid",
                                             "tanh", "abs", "sqrt", "sin", "cos", "min", "max"}
# names a constant, parameter or gate may not take: every symbol and function of the language
RESERVED = SPEC_NAME_RESERVED | {*VECTOR_CALLS, *TABLE_CALLS, "normal", "eye", "Dk"}
MAX_ROWS = 1024  # rows F of a matrix parameter [F, Dk] (the feature width of matmul(W, q))
MAX_TABLE = 4096  # entries NB of a table parameter [H, NB] or [NB] (read by lookup)
PARAMETER_SHAPES = ("[], [H], [Dk], [H, Dk], [F, Dk], [H, F, Dk] (F an integer or a numeric constant), or a table "
                    "[H, NB] / [NB] (NB an integer or a numeric constant)")
MAX_WINDOW = 2**31 - 1  # the largest window: the kernels compare int32 positions


@dataclass(frozen=True)
class Normalize:
    """Row normalisation: none, rowsum (with eps added or clamped), or softmax."""
    kind: str = "none"
    eps: float = 0.0
    eps_mode: str = "add"


@dataclass(frozen=True)
class Parameter:
    """A tensor of the spec: shape () (scalar), ('H',) (per head), ('Dk',) / ('H', 'Dk') (a vector: one value per
    element of q and k), (F, 'Dk') / ('H', F, 'Dk') (a matrix for matmul(W, q), F an int), ('H', NB) / (NB,) (a table
    of NB entries read by lookup(table, t5_bucket(...)), NB an int). ``init`` is an expression
    in h, H, d (every element that value), or ``draw``: 'normal' (N(0, init**2) from a generator seeded with
    ``seed``) or 'eye' (the identity, matrices)."""
    name: str
    shape: tuple
    init: str
    init_expr: sympy.Expr = field(compare=False)
    symbol: sympy.Symbol = field(compare=False)
    learnable: bool = True  # False: the per-call scale, or a fixed tensor (learnable: false); each call may pass it
    draw: str = ""  # '' (init is the value), 'normal' (init is the standard deviation) or 'eye'
    seed: int = 0  # the seed of a 'normal' draw

    @property
    def per_head(self) -> bool:
        return self.shape[:1] == ("H",)

    @property
    def kind(self) -> str:
        """'scalar' (shape [] or [H]), 'vector' ([Dk], [H, Dk]), 'matrix' ([F, Dk], [H, F, Dk]) or 'table'
        ([H, NB], [NB])."""
        if self.shape and isinstance(self.shape[-1], int):
            return "table"
        if self.shape[-1:] != ("Dk",):
            return "scalar"
        return "matrix" if isinstance(self.shape[-2:][0], int) else "vector"

    @property
    def rows(self) -> int | None:
        return self.shape[-2] if self.kind == "matrix" else None

    @property
    def buckets(self) -> int:
        """NB, the entries of a table parameter (0 for the other kinds)."""
        return self.shape[-1] if self.kind == "table" else 0

    def tensor_shape(self, heads: int, head_dim: int) -> tuple:
        """The shape of its tensor at H = heads, d = head_dim."""
        return tuple(heads if s == "H" else head_dim if s == "Dk" else s for s in self.shape)

    def canonical(self) -> list:
        out = [self.name, list(self.shape), self.init] + ([] if self.learnable else ["fixed"])
        return out + ([f"draw {self.draw} seed {self.seed}"] if self.draw else [])


@dataclass(frozen=True)
class Gate:
    """A per-token gate: an input tensor of log-space values g <= 0, passed to the op as a keyword named ``name``.

    per "head": [B, H, T] ("bhtd") or [B, T, H] ("bthd"); the reweighting gains exp(G_i - G_j), G the inclusive
    cumulative sum of g along the sequence (a softmax-family spec: the score gains G_i - G_j).
    per "key_dim": [B, H, T, Dk] / [B, T, H, Dk]; it enters each dimension d of the similarity's dot product:
    sum_d a_d(q_i) b_d(k_j) exp(G_id - G_jd) (GLA)."""
    name: str
    per: str
    symbol: sympy.Symbol = field(compare=False)


@dataclass(frozen=True)
class Rotary:
    """Rotary positions (RoPE): q and k rotated by their positions before the similarity, dimension i paired with
    i + d/2 (the rotate-half convention of Llama and transformers), frequencies theta**(-2i/d)."""
    theta: float = DEFAULT_THETA


@dataclass(frozen=True)
class Term:
    """One term of a spec with terms: its own spec (the shared keys and the term's similarity, reweight, normalize,
    window), a coefficient (an expression in constants, scalar parameters, d, h, H) and an optional slice [lo, hi) of
    the head dim of q and k (expressions in d, the head dim of the call), which the term sees as its q and k."""
    spec: "Spec"
    coefficient: str
    coefficient_expr: sympy.Expr = field(compare=False)
    slice: tuple | None = None  # (lo, hi) as written
    slice_exprs: tuple | None = field(compare=False, default=None)

    def canonical(self) -> list:
        return [self.spec.canonical(), self.coefficient, list(self.slice) if self.slice else None]


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
    max_length: str = ""  # the source of the max_length key ('' if absent); hashed when set
    # its value: an int (positions 0 .. limit - 1), an expression in n_q, n_k evaluated per call, or None
    length_limit: object = field(compare=False, default=None)
    gates: tuple = ()  # of Gate (at most MAX_GATES)
    rotary: Rotary | None = None
    window: int | None = None  # the attended pairs are |i - j| < window (with causal: 0 <= i - j < window)
    # a spec of several terms (docs/specs.md, "terms"): each a Term; the spec's own normalize is then the shared
    # normaliser (kind none: each term normalises its own output), its similarity a description
    terms: tuple = ()

    @property
    def gate(self) -> Gate | None:
        return self.gates[0] if self.gates else None

    @property
    def gate_names(self) -> tuple:
        return tuple(g.name for g in self.gates)

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
            "parameters": [p.canonical() for p in self.parameters],
            "approx": self.approx,
        } | ({"max_length": self.max_length} if self.max_length else {}) \
          | ({"gates": [[g.name, g.per] for g in self.gates]} if self.gates else {}) \
          | ({"rotary": self.rotary.theta} if self.rotary is not None else {}) \
          | ({"window": self.window} if self.window is not None else {}) \
          | ({"terms": [t.canonical() for t in self.terms]} if self.terms else {})

    @functools.cached_property
    def hash(self) -> str:  # computed once (the spec is frozen): states are checked against it per decode step
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
        if self.terms:
            return _terms_yaml(self)
        data = {"name": self.name, "description": self.description, "causal": self.causal,
                "similarity": self.similarity, "reweight": self.reweight,
                "normalize": self.normalize.kind}
        if self.normalize.kind == "rowsum":  # eps is refused for the other kinds, so it is written only here
            data["normalize"] = {"kind": "rowsum", "eps": self.normalize.eps, "eps_mode": self.normalize.eps_mode}
        constants = {c.name: c.source for c in self.constants}
        constants |= {p.name: p.init for p in self.parameters if _is_scale(p)}  # the per-call scale
        if constants:
            data["constants"] = constants
        if any(not _is_scale(p) for p in self.parameters):
            data["parameters"] = {p.name: _parameter_yaml(p) for p in self.parameters if not _is_scale(p)}
        if self.gates:
            data["gates"] = {g.name: g.per for g in self.gates}
        if self.rotary is not None:
            data["rotary"] = {"theta": self.rotary.theta}
        if self.approx != "null":
            data["approx"] = json.loads(self.approx)
        if self.max_length:
            data["max_length"] = self.max_length
        if self.window is not None:
            data["window"] = self.window
        return yaml.safe_dump(data, sort_keys=False)


def _is_scale(p: Parameter) -> bool:
    return p.name == SCALE and not p.learnable and p.shape == () and not p.draw


def _parameter_yaml(p: Parameter) -> dict:
    init = {"normal": f"normal({p.init})", "eye": "eye"}.get(p.draw, p.init)
    out = {"shape": list(p.shape), "init": init}
    out |= {} if p.learnable else {"learnable": False}
    return out | ({"seed": p.seed} if p.draw == "normal" else {})


# ---------------------------------------------------------------------------------------------
def spec_files() -> list:
    """The built-in specs shipped in the package (attngen/specs/*.yaml), as paths."""
    folder = Path(str(resources.files("attngen").joinpath("specs")))
    return sorted(folder.glob("*.yaml"))


def builtin_names() -> list:
    """Names of the built-in specs shipped with attngen."""
    return sorted(p.stem for p in spec_files())


def spec_modes(source) -> tuple:
    """The modes (causal flags) a spec loads in: (True,) for a gated spec (a gate decays the past), else (True,
    False). ``source`` is anything load_spec takes."""
    return (True,) if load_spec(source).gates else (True, False)


def builtin_specs() -> list:
    """Every built-in spec in every mode it has (the causal one first)."""
    return [load_spec(name, causal=c) for name in builtin_names() for c in spec_modes(name)]


def load_spec(source, **overrides) -> Spec:
    """Load a spec from a built-in name (``"cosformer"``), YAML text, a file (a ``pathlib.Path``, or a string
    ending in .yaml / .yml), a mapping or a Spec.

    A plain string is a built-in name or YAML text (it holds a newline, starts with '{', or starts like a
    mapping: ``name: x``), and is read as a file path only when it ends in .yaml or .yml: spec text from an
    untrusted source is never taken for the name of some other file. load_spec_file reads any path.
    ``overrides`` replace top-level keys or constants: ``load_spec("cosformer", causal=False, M=4096)``.
    Raises SpecError with the file, key, what was found and how to fix it.
    """
    if isinstance(source, Spec):
        data, where = _parse_yaml(source.to_yaml(), source.where, limit=None), source.where  # loaded once already
    elif isinstance(source, Mapping):
        data, where = source, "<dict>"
    elif isinstance(source, Path):
        data, where = _read_file(source)
    elif isinstance(source, str):
        data, where = _read_text(source)
    else:
        raise SpecError(f"cannot load a spec from {type(source).__name__}",
                        expected="a path, a built-in name, YAML text, or a dict")
    return build_spec(data, where, overrides)


def load_spec_file(path, **overrides) -> Spec:
    """Load a spec from the YAML file at ``path`` (a str or a pathlib.Path, any suffix): a regular file of at
    most MAX_SPEC_BYTES. Raises SpecError (a missing file, a directory, a device or FIFO, invalid YAML)."""
    if not isinstance(path, (str, Path)):
        raise SpecError(f"cannot read a spec file from {type(path).__name__}", expected="a str or a pathlib.Path")
    data, where = _read_file(Path(path))
    return build_spec(data, where, overrides)


def _key(k) -> str:
    """A mapping key as text (keys of a Python dict may be any hashable, e.g. a 5000-digit int)."""
    return k if isinstance(k, str) else brief(k)


def _listing(items, most: int = 8) -> list:
    """Up to ``most`` items, as text, sorted: for messages about unknown keys (of a mapping of any size)."""
    out = []
    for item in items:
        out.append(brief(item, 40) if not isinstance(item, str) else item[:40])
        if len(out) >= 4 * most:
            break
    return sorted(out)[:most]


MAPPING_START = re.compile(r"\s*(\{|[A-Za-z_][A-Za-z0-9_]*\s*:(\s|$))")


def _read_text(text: str) -> tuple:
    """A plain string: YAML text, a built-in name, or (ending in .yaml / .yml) a file path."""
    builtin = {p.stem: p for p in spec_files()}
    if not text.strip():
        raise SpecError("the spec source is empty", where="<empty>",
                        expected="a built-in name, YAML text, a .yaml file path or a dict")
    if "\n" in text or MAPPING_START.match(text):
        return _parse_yaml(text, "<yaml string>"), "<yaml string>"
    if text in builtin:
        data, _ = _read_file(builtin[text])
        return data, f"{text} (built-in {builtin[text].name})"
    if text.strip().lower().endswith(SUFFIXES):
        return _read_file(Path(text))
    fix = _did_you_mean(text, builtin) + "check the path, or run 'attngen list' for the built-in names"
    if "/" in text or "." in text or os.sep in text:  # meant as a path
        fix += (" (a string is read as a file only when it ends in .yaml or .yml; pass a pathlib.Path or use "
                "load_spec_file for others)")
    raise SpecError(f"no spec file or built-in spec named {brief(text, 200)}", where=_where(text),
                    expected="a YAML file path or one of " + ", ".join(sorted(builtin)), fix=fix)


def _did_you_mean(text: str, names) -> str:
    """'did you mean 'x'? ' when ``text`` (a name, or a path whose stem) is close to built-in ``names``, else ''."""
    stem = Path(text).stem if text.strip().lower().endswith(SUFFIXES) else text
    close = difflib.get_close_matches(stem.strip().lower(), sorted(names), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(map(repr, close))}? Otherwise " if close else ""


def _where(text: str) -> str:
    """A path or name as the 'where' of a message: itself when short and printable, else a short repr."""
    return text if len(text) <= 200 and text.isprintable() else brief(text, 200)


def _read_file(path: Path) -> tuple:
    """The mapping in the YAML file at ``path``: a regular file (not a directory, device or FIFO, which could
    block or never end), read up to MAX_SPEC_BYTES + 1 bytes."""
    where = str(path)
    builtin = sorted(p.stem for p in spec_files())
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise SpecError(f"no spec file or built-in spec named {brief(where, 200)}", where=_where(where),
                        expected="a YAML file path or one of " + ", ".join(builtin),
                        fix=_did_you_mean(path.name, builtin)
                        + "check the path, or run 'attngen list' for the built-in names") from None
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte, no permission
        raise SpecError(f"cannot read the file: {type(exc).__name__}", where=_where(where)) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
        raise SpecError(f"cannot read the file: it is {kind}, not a regular file", where=where,
                        expected="a YAML file")
    if info.st_size > MAX_SPEC_BYTES:
        raise SpecError(f"the file is {info.st_size} bytes long", where=where, expected=f"at most {MAX_SPEC_BYTES}",
                        fix="a spec is a few lines of YAML")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO swapped in: no blocking
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced between stat and open
                raise SpecError("cannot read the file: it is not a regular file", where=where)
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read the file: {type(exc).__name__}", where=where) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"the file is more than {MAX_SPEC_BYTES} bytes long", where=where,
                        expected=f"at most {MAX_SPEC_BYTES}", fix="a spec is a few lines of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"cannot read the file: it is not UTF-8 text (byte {exc.start})", where=where) from None
    return _parse_yaml(text, where), where


class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: aliases and anchors are refused (an alias bomb of a few hundred bytes
    expands into gigabytes when the value is walked), and so are merge keys and duplicate keys (which PyYAML
    resolves silently, the last one winning)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors (&name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def compose_sequence_node(self, anchor):
        node = super().compose_sequence_node(anchor)
        if len(node.value) > MAX_ENTRIES:
            raise yaml.composer.ComposerError(None, None, f"a list of {len(node.value)} items (at most "
                                              f"{MAX_ENTRIES})", node.start_mark)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            if len(node.value) > MAX_ENTRIES:
                raise yaml.constructor.ConstructorError(None, None, f"a mapping of {len(node.value)} keys (at most "
                                                        f"{MAX_ENTRIES})", node.start_mark)
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise yaml.constructor.ConstructorError(None, None, "merge keys (<<) are not allowed",
                                                            key_node.start_mark)
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key (first at line {first.line + 1}, column {first.column + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str, limit: int | None = MAX_SPEC_BYTES) -> dict:
    """The mapping in YAML ``text`` (at most ``limit`` characters); a SpecError says the line, column and kind
    of a mistake, never the text."""
    if limit is not None and len(text) > limit:
        raise SpecError(f"the YAML text is {len(text)} characters long", where=where,
                        expected=f"at most {MAX_SPEC_BYTES}", fix="a spec is a few lines of YAML")
    if _flow_depth(text) > MAX_YAML_DEPTH:  # PyYAML needs ~1 s to reach its RecursionError on such input
        raise SpecError(f"YAML is nested more than {MAX_YAML_DEPTH} levels deep", where=where)
    try:
        data = yaml.load(text, Loader=SpecLoader)  # noqa: S506 (a SafeLoader)
    except yaml.reader.ReaderError as exc:
        raise SpecError(f"invalid YAML at character {exc.position + 1}: {_kind(exc.reason)}", where=where) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"invalid YAML{at}: {_kind(exc.problem or exc.context or 'syntax error')}",
                        where=where) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"invalid YAML: {type(exc).__name__}", where=where) from None
    except RecursionError:
        raise SpecError("YAML is nested too deeply", where=where) from None
    except ValueError:  # e.g. an integer literal beyond Python's int-to-str digit limit
        raise SpecError("invalid YAML: a value cannot be converted (e.g. an integer of too many digits)",
                        where=where) from None
    if not isinstance(data, dict):
        raise SpecError(f"the document is a {type(data).__name__}", where=where,
                        expected="a mapping with keys " + ", ".join(KEYS))
    return data


def _kind(problem: str) -> str:
    """PyYAML's description of a problem with the quoted text taken out (the file's content is not echoed)."""
    return re.sub(r"'[^'\n]*'|\"[^\"\n]*\"|#x[0-9a-fA-F]+", "…", str(problem))[:120]


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
            raise SpecError(f"mode mapping has unknown keys {_listing(extra)}", where=where, key=key,
                            expected="only 'causal' and 'bidirectional'")
        mode = "causal" if causal else "bidirectional"
        if mode not in value:
            raise SpecError(f"no branch for the {mode} mode", where=where, key=key,
                            fix=f"add '{mode}: ...' to the mapping")
        return value[mode]
    return value


def _check_name(name, where, key, reserved=RESERVED):
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SpecError(f"invalid name {brief(name)}", where=where, key=key,
                        expected="an identifier such as 'gamma' or 'M' (a letter, then letters, digits or _)")
    if len(name) > MAX_NAME:
        raise SpecError(f"the name is {len(name)} characters long", where=where, key=key,
                        expected=f"at most {MAX_NAME} characters", fix="choose a shorter name")
    if name in reserved:
        raise SpecError(f"{name!r} is a reserved name", where=where, key=key,
                        fix="choose another name (reserved: " + ", ".join(sorted(reserved)) + ")")


def build_spec(data: dict, where: str, overrides: dict | None = None) -> Spec:
    """Validate the mapping ``data`` (+ overrides) and build the Spec for its mode."""
    if not isinstance(data, Mapping):
        raise SpecError(f"found {type(data).__name__}", where=where, expected="a mapping with keys " + ", ".join(KEYS))
    if len(data) > MAX_ENTRIES:
        raise SpecError(f"the mapping has {len(data)} keys", where=where, expected="the keys " + ", ".join(KEYS))
    data = {_key(k): v for k, v in data.items()}
    overrides = dict(overrides or {})
    unknown = set(data) - set(KEYS)
    if unknown:
        raise SpecError(f"unknown key(s) {_listing(unknown)}", where=where,
                        expected="keys among " + ", ".join(KEYS), fix="check the spelling (docs/specs.md)")
    for key in ("causal", "name", "description", "similarity", "reweight", "normalize", "approx", "window"):
        if key in overrides:
            data[key] = overrides.pop(key)

    causal = data.get("causal", True)
    if not isinstance(causal, bool):
        raise SpecError(f"found {brief(causal, 40)}", where=where, key="causal", expected="true or false")
    if "terms" in data:
        return _terms_spec(data, causal, where, overrides)
    name = data.get("name")
    if name is None and where not in ("<dict>", "<yaml string>"):
        name = Path(where).stem
    _check_name(name, where, "name", SPEC_NAME_RESERVED)
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        raise SpecError("description must be text", where=where, key="description")
    if len(description) > MAX_SPEC_BYTES:
        raise SpecError(f"the description is {len(description)} characters long", where=where, key="description",
                        expected=f"at most {MAX_SPEC_BYTES}")

    constants, bounds = _constants(data.get("constants") or {}, overrides, causal, where)
    constants, fixed = _scale_constant(constants, where)
    parameters = _parameters(data.get("parameters") or {}, causal, where, {c.name: c.symbol for c in constants},
                             bounds.numbers) + fixed
    names = {c.name: c.symbol for c in constants} | {p.name: p.symbol for p in parameters}
    rows = {p.symbol: p.rows for p in parameters if p.kind == "matrix"}
    tables = {p.symbol: p.buckets for p in parameters if p.kind == "table"}
    gates = _gates(_pick_mode(data.get("gates"), causal, where, "gates"), causal, where, set(names))
    rotary = _rotary(_pick_mode(data.get("rotary"), causal, where, "rotary"), where)
    implicit = SCALE not in names  # the per-call scale, declared by using it
    if implicit:
        names[SCALE] = sympy.Symbol(SCALE, real=True)

    scalar_names = {k: v for k, v in BUILTIN_SYMBOLS.items() if k not in ("i", "j")} | names
    if "similarity" not in data:
        raise SpecError("missing key 'similarity'", where=where, expected="e.g. similarity: dot(q, k)")
    similarity = _pick_mode(data["similarity"], causal, where, "similarity")
    sim_ctx = Context(where, "similarity", scalar_names, True,
                      {"i": "positions belong in 'reweight'", "j": "positions belong in 'reweight'"},
                      bounds.numbers, rows)
    sim_expr = parse_expression(similarity, sim_ctx)
    bounds.check(sim_expr, where, "similarity", similarity=True)

    reweight = _pick_mode(data.get("reweight", 1), causal, where, "reweight")
    if reweight is None:
        reweight = 1
    rw_ctx = Context(where, "reweight", dict(BUILTIN_SYMBOLS) | names, False,
                     {"q": "the reweighting depends on positions only; put q, k in 'similarity'",
                      "k": "the reweighting depends on positions only; put q, k in 'similarity'"}, bounds.numbers,
                     tables=tables, bidirectional=not causal)
    rw_expr = parse_expression(reweight, rw_ctx)
    bounds.check(rw_expr, where, "reweight")

    if implicit:
        scale = names.pop(SCALE)
        if sim_expr.has(scale) or rw_expr.has(scale):
            init = parse_expression(DEFAULT_SCALE, Context(where, "scale", {"d": BUILTIN_SYMBOLS["d"]}, False, {}))
            parameters.append(Parameter(SCALE, (), DEFAULT_SCALE, init, scale, learnable=False))
    normalize = _normalize(_pick_mode(data.get("normalize", "none"), causal, where, "normalize"), where)
    approx = _pick_mode(data.get("approx"), causal, where, "approx")
    approximation = parse_approx(approx, causal, where, load_spec, builtin_names)
    _check_plain(approx, where, "approx")  # bounded before json.dumps walks it (shared references could explode)
    try:
        approx_json = json.dumps(approx, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SpecError(f"approx is not plain data: {type(exc).__name__}", where=where, key="approx") from None
    max_length, limit = _max_length(_pick_mode(data.get("max_length"), causal, where, "max_length"), names,
                                    bounds, where)
    window = _window(_pick_mode(data.get("window"), causal, where, "window"), constants, bounds, where)
    _check_window_combinations(window, gates, approximation, where)
    return Spec(name=name, description=description.strip(), causal=causal, similarity=str(similarity),
                reweight=str(reweight), normalize=normalize, constants=tuple(constants),
                parameters=tuple(parameters), approx=approx_json, where=where,
                similarity_expr=sim_expr, reweight_expr=rw_expr, approximation=approximation,
                max_length=max_length, length_limit=limit, gates=gates, rotary=rotary, window=window)


def _terms_spec(data: dict, causal: bool, where: str, overrides: dict) -> Spec:
    """A spec of several terms: each term is built (and validated) as a spec of its own from the shared keys and its
    own; the result holds them in ``terms``."""
    raw = _pick_mode(data["terms"], causal, where, "terms")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_SPEC_TERMS:
        raise SpecError(f"found {brief(raw, 60)}", where=where, key="terms",
                        expected=f"a list of 1 .. {MAX_SPEC_TERMS} mappings with keys among " + ", ".join(TERM_KEYS),
                        fix="e.g. terms: [{similarity: exp(dot(q, k) * scale), normalize: rowsum}, ...]")
    inside = [k for k in ("similarity", "reweight", "window", "approx") if k in data]
    if inside:
        raise SpecError(f"{', '.join(inside)} beside terms", where=where, key=inside[0],
                        expected="similarity, reweight and window in each term; no approx with terms",
                        fix="move the key into the terms that use it")
    name = data.get("name")
    if name is None and where not in ("<dict>", "<yaml string>"):
        name = Path(where).stem
    _check_name(name, where, "name", SPEC_NAME_RESERVED)
    shared = _normalize(_pick_mode(data["normalize"], causal, where, "normalize"), where) \
        if data.get("normalize") is not None else None
    if shared is not None and shared.kind == "softmax":
        raise SpecError("a shared softmax normaliser", where=where, key="normalize",
                        expected="rowsum (shared row sums of every term) or none",
                        fix="give each softmax term its own normalize: softmax (or rowsum of an exp similarity)")
    terms = []
    for n, item in enumerate(raw):
        key = f"terms[{n}]"
        if not isinstance(item, Mapping):
            raise SpecError(f"found {brief(item, 40)}", where=where, key=key,
                            expected="a mapping with keys among " + ", ".join(TERM_KEYS))
        item = {_key(k): v for k, v in item.items()}
        extra = set(item) - set(TERM_KEYS)
        if extra:
            raise SpecError(f"unknown key(s) {_listing(extra)}", where=where, key=key,
                            expected="keys among " + ", ".join(TERM_KEYS))
        if shared is not None and "normalize" in item:
            raise SpecError("a term's normalize beside the shared one", where=where, key=f"{key}.normalize",
                            expected="one of the two", fix="remove the top-level normalize for a normaliser per term")
        sub = {k: data[k] for k in TERM_SHARED if k in data} | {k: item[k] for k in TERM_KEYS[:4] if k in item}
        sub["name"] = f"{name}_t{n}"
        if shared is not None:
            sub["normalize"] = "none"
        spec = _term_spec(sub, where, overrides, key)
        if shared is not None and isinstance(spec.similarity_expr, sympy.exp):
            # an exp term under the shared normaliser runs as a softmax (its own row sum, no eps) that also returns
            # its log row sum, from which attngen.runtime.terms rebuilds N_t and Z_t with one shift per row
            spec = _term_spec(sub | {"normalize": "rowsum"}, where, overrides, key)
        elif shared is not None and spec.similarity_expr.has(sympy.exp):
            raise SpecError(f"the similarity {spec.similarity} holds exp() but is not exp(score)", where=where,
                            key=f"{key}.similarity",
                            expected="under a shared rowsum, exp only as the whole similarity, exp(score) (its row "
                            "sum is then kept as a log-sum-exp: no overflow), or no exp at all",
                            fix="write the term as exp(score) (a factor c as exp(score + log(c)), or as the "
                            "term's coefficient), or give each term its own normalize")
        terms.append(_term(item, spec, where, key))
    first = terms[0].spec
    params = {}
    for t in terms:
        params |= {p.name: p for p in t.spec.parameters if p.name not in params}
    # each term keeps the parameters its own expressions use (its op takes those, its kernels load those); the
    # spec keeps them all (a coefficient may use one no term uses)
    terms = [replace(t, spec=replace(t.spec, parameters=tuple(
        p for p in t.spec.parameters if p.symbol in t.spec.similarity_expr.free_symbols
        | t.spec.reweight_expr.free_symbols))) for t in terms]
    text = " + ".join(f"{t.coefficient} * [{t.spec.similarity}]" for t in terms)
    return Spec(name=name, description=first.description, causal=causal, similarity=text, reweight="1",
                normalize=shared or Normalize(), constants=first.constants, parameters=tuple(params.values()),
                approx="null", where=where, similarity_expr=sympy.Integer(0), reweight_expr=sympy.Integer(1),
                max_length=first.max_length, length_limit=first.length_limit, gates=first.gates, rotary=first.rotary,
                terms=tuple(terms))


def _term_spec(sub: dict, where: str, overrides: dict, key: str) -> Spec:
    """The spec of one term (its errors renamed to the term's keys)."""
    try:
        return build_spec(sub, where, dict(overrides))
    except SpecError as exc:
        raise SpecError(exc.what, where=where, key=f"{key}.{exc.key}" if exc.key else key,
                        expected=exc.expected, fix=exc.fix) from None


def shared_exp_terms(spec: Spec) -> tuple:
    """The indices of the terms of ``spec`` that run as a softmax returning its log row sum: the exp(score) terms
    under a shared normaliser (their own spec then normalises by its row sum; the other terms' by none)."""
    if not spec.terms or spec.normalize.kind == "none":
        return ()
    return tuple(n for n, t in enumerate(spec.terms) if t.spec.normalize.kind != "none")


def _term(item: dict, spec: Spec, where: str, key: str) -> Term:
    """The term's coefficient and slice around its spec."""
    names = {c.name: c.symbol for c in spec.constants} | {p.name: p.symbol for p in spec.parameters
                                                          if p.kind == "scalar"}
    ctx = Context(where, f"{key}.coefficient", {k: v for k, v in BUILTIN_SYMBOLS.items()
                                                if k in ("d", "h", "H")} | names, False,
                  {"q": "a coefficient is a number per head", "k": "a coefficient is a number per head",
                   "i": "a coefficient is the same for every position", "j": "a coefficient is the same for every "
                   "position"})
    raw = item.get("coefficient", 1)
    if isinstance(raw, bool):
        raise SpecError(f"found {raw!r}", where=where, key=f"{key}.coefficient", expected="a number or expression")
    coefficient = parse_expression(raw, ctx)
    bounds = None
    if "slice" in item:
        pair = item["slice"]
        if not isinstance(pair, list) or len(pair) != 2 or any(isinstance(x, bool) for x in pair):
            raise SpecError(f"found {brief(pair, 40)}", where=where, key=f"{key}.slice",
                            expected="[lo, hi]: the head dims lo .. hi - 1 of q and k, numbers or expressions in d",
                            fix="e.g. slice: [0, d/2]")
        sctx = Context(where, f"{key}.slice", {"d": BUILTIN_SYMBOLS["d"]}, False, {})
        bounds = tuple(parse_expression(x, sctx) for x in pair)
    return Term(spec, raw if isinstance(raw, str) else repr(raw), coefficient,
                tuple(x if isinstance(x, str) else repr(x) for x in item["slice"]) if bounds else None, bounds)


def _terms_yaml(spec: Spec) -> str:
    """to_yaml of a spec with terms: the shared keys once, then each term's own."""
    first = yaml.safe_load(spec.terms[0].spec.to_yaml())
    data = {"name": spec.name, "description": spec.description, "causal": spec.causal}
    data |= {k: first[k] for k in ("constants", "gates", "rotary", "max_length") if k in first}
    if any(not _is_scale(p) for p in spec.parameters):  # all of them: each term keeps only those it uses
        data["parameters"] = {p.name: _parameter_yaml(p) for p in spec.parameters if not _is_scale(p)}
    # the per-call scale at its default is implicit in each term that uses it (written once, every term would get it)
    scales = {p.init for t in spec.terms for p in t.spec.parameters if _is_scale(p)}
    if scales <= {DEFAULT_SCALE} and "scale" in data.get("constants", {}):
        data["constants"] = {k: v for k, v in data["constants"].items() if k != SCALE} or None
        if data["constants"] is None:
            del data["constants"]
    if spec.normalize.kind != "none":
        data["normalize"] = {"kind": "rowsum", "eps": spec.normalize.eps, "eps_mode": spec.normalize.eps_mode}
    terms = []
    for t in spec.terms:
        own = yaml.safe_load(t.spec.to_yaml())
        item = {k: own[k] for k in ("similarity", "reweight", "window") if k in own}
        if spec.normalize.kind == "none":
            item["normalize"] = own["normalize"]
        item["coefficient"] = t.coefficient
        if t.slice:
            item["slice"] = list(t.slice)
        terms.append(item)
    data["terms"] = terms
    return yaml.safe_dump(data, sort_keys=False)


def _scale_constant(constants: list, where: str) -> tuple:
    """The constant named ``scale`` (if any) becomes the per-call scale: a fixed scalar parameter whose init is
    the constant's value (a number or an expression in d), which each call may replace with ``scale=``."""
    found = [c for c in constants if c.name == SCALE]
    if not found:
        return constants, []
    c = found[0]
    key = f"constants.{SCALE}"
    extra = {str(s) for s in c.expr.free_symbols} - {"d"}
    if extra:
        raise SpecError(f"the scale uses {_listing(extra)}", where=where, key=key,
                        expected="a number or an expression in d (the per-call scale's default, e.g. 1/sqrt(d))",
                        fix="write the scale with d only; each call may pass scale= for anything else")
    users = [o.name for o in constants if o is not c and o.expr.has(c.symbol)]
    if users:
        raise SpecError(f"the constant(s) {_listing(users)} use the scale", where=where, key=key,
                        expected="the per-call scale used in expressions only, not in other constants",
                        fix="write the scale into the similarity, e.g. dot(q, k) * scale")
    fixed = Parameter(SCALE, (), c.source, c.expr, c.symbol, learnable=False)
    return [o for o in constants if o is not c], [fixed]


def _gates(raw, causal: bool, where: str, taken: set) -> tuple:
    """The gates key: a mapping name -> head | key_dim (or {per: ...}); causal specs only."""
    if raw is None or raw == {}:
        return ()
    if not isinstance(raw, dict):
        raise SpecError(f"found {brief(raw, 40)}", where=where, key="gates",
                        expected="a mapping name -> head or key_dim, e.g. {g: head}")
    if len(raw) > MAX_GATES:
        raise SpecError(f"{len(raw)} gates", where=where, key="gates", expected=f"at most {MAX_GATES}",
                        fix="sum the log gates into one (exp(G_i - G_j) multiplies)")
    if not causal:
        raise SpecError("a gate on a bidirectional spec", where=where, key="gates",
                        expected="causal: true (a gate decays the past: exp(G_i - G_j) for j <= i)",
                        fix="use the causal mode; for both directions run two causal ops (the second on the reversed "
                            "sequence) or write a two-sided decay in 'reweight'")
    out = []
    for name, body in raw.items():
        key = f"gates.{_key(name)}"
        _check_name(name, where, key)
        if name in taken or name == SCALE:
            raise SpecError(f"{name!r} is both a gate and a constant or parameter", where=where, key=key,
                            fix="give the gate its own name")
        if isinstance(body, dict):
            extra = set(map(_key, body)) - {"per"}
            if extra:
                raise SpecError(f"unknown key(s) {_listing(extra)}", where=where, key=key, expected="per")
            body = body.get("per", "head")
        if body not in GATE_KINDS:
            raise SpecError(f"found {brief(body, 40)}", where=where, key=key,
                            expected="head (a gate [B, H, T] per head) or key_dim ([B, H, T, Dk], GLA)")
        out.append(Gate(name, body, sympy.Symbol(name, real=True)))
    return tuple(out)


def _rotary(raw, where: str) -> Rotary | None:
    """The rotary key: true, false / null, or {theta: number > 1}."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return Rotary()
    if not isinstance(raw, dict):
        raise SpecError(f"found {brief(raw, 40)}", where=where, key="rotary",
                        expected="true or {theta: 10000} (RoPE with the rotate-half pairing)")
    extra = set(map(_key, raw)) - {"theta"}
    if extra:
        raise SpecError(f"unknown key(s) {_listing(extra)}", where=where, key="rotary", expected="theta")
    theta = raw.get("theta", DEFAULT_THETA)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (1 < theta < 1e12):
        raise SpecError(f"theta {brief(theta, 40)}", where=where, key="rotary.theta",
                        expected="a number in (1, 1e12), e.g. 10000 (Llama 2) or 500000 (Llama 3)")
    return Rotary(float(theta))


WINDOW_EXPECTED = (f"an integer in 1 .. {MAX_WINDOW} (the attended pairs are |i - j| < window), or the name of a "
                   "numeric constant with such a value")


def _window(raw, constants: list, bounds: _Bounds, where: str) -> int | None:
    """The window key: an integer in 1 .. MAX_WINDOW, or the name of a declared constant with such a value (looked
    up by name, never parsed: the text is not an expression); None when absent."""
    if raw is None:
        return None
    key = "window"
    if isinstance(raw, bool):
        raise SpecError(f"found {raw!r}", where=where, key=key, expected=WINDOW_EXPECTED,
                        fix="write the number of positions, e.g. window: 256 (remove the key for no window)")
    source = raw
    if isinstance(raw, str):
        names = {c.name: c for c in constants}
        if raw not in names:
            known = ", ".join(n for n, c in names.items() if c.symbol in bounds.numbers) or "none"
            raise SpecError(f"{brief(raw, 40)} is not a declared numeric constant", where=where, key=key,
                            expected=f"{WINDOW_EXPECTED} (numeric constants here: {known})",
                            fix="write an integer, e.g. window: 256, or declare the constant under 'constants'")
        number = bounds.numbers.get(names[raw].symbol)
        if number is None:
            raise SpecError(f"the constant {raw!r} is {brief(bounds.values[names[raw].symbol], 60)}, not a number",
                            where=where, key=key, expected=WINDOW_EXPECTED,
                            fix="a window is fixed per spec: give the constant a number, not an expression in the "
                                "lengths")
        raw = number
    if isinstance(raw, float) and raw == int(raw) and isinstance(source, str):
        raw = int(raw)  # a constant's value (2**8 is folded to 256.0)
    if not isinstance(raw, int) or not 1 <= raw <= MAX_WINDOW:
        what = f"the constant {source!r} = {brief(raw, 40)}" if isinstance(source, str) else f"found {brief(raw, 40)}"
        raise SpecError(what, where=where, key=key, expected=WINDOW_EXPECTED,
                        fix="use a whole number of positions >= 1, e.g. window: 256")
    return raw


def _check_window_combinations(window, gates: tuple, approximation, where: str) -> None:
    """SpecError for what a window does not combine with: a per-key-dimension gate (the linear ordering only,
    which a window rules out) and an approximation."""
    if window is None:
        return
    if any(g.per == "key_dim" for g in gates):
        raise SpecError("a window with a per-key-dimension gate", where=where, key="window",
                        expected="a per-head gate (gates: {g: head}) or none",
                        fix="a key_dim gate runs the linear ordering only, which a window rules out (the mask "
                            "[|i - j| < window] has no finite separation): remove the window or use a per-head gate")
    if approximation is not None:
        raise SpecError(f"a window with approx ({approximation.kind})", where=where, key="window",
                        expected="a window or an approximation, not both",
                        fix="remove approx (a window already makes the quadratic ordering linear in the length) "
                            "or remove the window")


MAX_LENGTH_LIMIT = 2**62  # a max_length beyond this is refused (positions are int64)


LENGTH_NODES = (sympy.Add, sympy.Mul, sympy.Pow, sympy.Max, sympy.Min, sympy.Symbol, sympy.Number)


def _max_length(raw, names: dict, bounds: _Bounds, where: str) -> tuple:
    """The max_length key: (its source, its value: an int, or an expression in n_q and n_k made of + - * /,
    integer powers, max and min, which each call evaluates at its lengths; None when absent)."""
    if raw is None:
        return "", None
    key = "max_length"
    if isinstance(raw, bool):
        raise SpecError(f"found {raw!r}", where=where, key=key, expected="a positive integer or a constant")
    lengths = {k: BUILTIN_SYMBOLS[k] for k in ("n_q", "n_k", "n")}
    ctx = Context(where, key, lengths | {k: v for k, v in names.items() if v in bounds.values}, False,
                  {"i": "max_length is a number of positions", "j": "max_length is a number of positions"},
                  bounds.numbers)
    value = bounds.check(parse_value(raw, ctx).expr, where, key)
    source = raw if isinstance(raw, str) else repr(raw)
    if value.is_number:
        number = numeric_value(value)
        if number != int(number) or not 1 <= number <= MAX_LENGTH_LIMIT:
            raise SpecError(f"the value is {brief(value, 40)}", where=where, key=key,
                            expected="an integer in 1 .. 2**62 (the number of positions the spec is valid for)")
        return source, int(number)
    extra = value.free_symbols - {BUILTIN_SYMBOLS["n_q"], BUILTIN_SYMBOLS["n_k"]}
    odd = [e for e in sympy.preorder_traversal(value) if not isinstance(e, LENGTH_NODES)
           or (isinstance(e, sympy.Pow) and not e.exp.is_Integer)]
    if extra or odd:
        raise SpecError(f"the value is {brief(value, 60)}", where=where, key=key,
                        expected="a number, or an expression in n_q and n_k with + - * /, integer powers, max, min")
    return source, value



def _check_plain(value, where: str, key: str) -> None:
    """SpecError unless ``value`` is plain data (mappings with text keys, lists, text, numbers, booleans, null)
    of at most MAX_PLAIN_NODES values (shared references counted each time) nested at most MAX_YAML_DEPTH."""
    stack, count = [(value, 0)], 1
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            count += len(item)  # before walking it: a list may hold millions of (shared) items
        if count > MAX_PLAIN_NODES or depth > MAX_YAML_DEPTH:
            raise SpecError(f"{key} holds more than {MAX_PLAIN_NODES} values or is nested more than "
                            f"{MAX_YAML_DEPTH} levels deep", where=where, key=key, expected="a small mapping")
        if isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    raise SpecError(f"a key {brief(k, 40)} is not text", where=where, key=key)
                stack.append((v, depth + 1))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, int) and not isinstance(item, bool) and item.bit_length() > 64:
            raise SpecError(f"found {brief(item, 40)}", where=where, key=key, expected="integers below 2**64")
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise SpecError(f"found a {type(item).__name__}", where=where, key=key,
                            expected="plain data: mappings, lists, text, numbers, true/false, null")


@dataclass
class _Bounds:
    """What bounds the planner's work on expressions that use constants: each constant's value with the
    constants it uses substituted, its size in nodes and the depth of its chain of references."""
    values: dict = field(default_factory=dict)  # symbol -> value in n_q, n_k, d, h, H
    sizes: dict = field(default_factory=dict)  # symbol -> nodes of that value
    depths: dict = field(default_factory=dict)  # symbol -> 1 + the deepest constant it uses
    calls: dict = field(default_factory=dict)  # symbol -> how deep function calls nest in that value
    numbers: dict = field(default_factory=dict)  # symbol -> float, for the numeric constants

    def check(self, expr, where: str, key: str, similarity: bool = False):
        """SpecError unless ``expr`` with the constants substituted stays small: at most MAX_SUBSTITUTED_NODES
        nodes, numbers within float64, a tensor degree <= MAX_SYMBOLIC_POWER (similarity), an expansion of
        at most MAX_TERMS terms. Returns the substituted expression."""
        used = [s for s in expr.free_symbols if s in self.sizes]
        size = tree_size(expr, self.sizes, MAX_SUBSTITUTED_NODES)
        if size > MAX_SUBSTITUTED_NODES:
            raise SpecError(f"with the constants it uses substituted, the expression has more than "
                            f"{MAX_SUBSTITUTED_NODES} nodes", where=where, key=key,
                            expected=f"at most {MAX_SUBSTITUTED_NODES}",
                            fix="use each constant fewer times, or simplify the constants")
        calls = call_depth(expr, self.calls)
        if calls > MAX_CALL_DEPTH:  # before substitute builds the nested calls (sympy evaluates each)
            raise SpecError(f"with the constants it uses substituted, function calls are nested {calls} deep",
                            where=where, key=key, expected=f"at most {MAX_CALL_DEPTH}",
                            fix="nest fewer functions through the constants")
        try:
            value = substitute(expr, self.values) if used else expr
        except (TypeError, ValueError) as exc:  # sympy refusing a node the substituted numbers make (min of x, y)
            raise SpecError(f"with the constants substituted, an expression cannot be formed: {exc}", where=where,
                            key=key, expected="expressions sympy can build from the constants' values",
                            fix="simplify the constants this expression uses") from None
        except OutOfRange:
            raise SpecError("with the constants substituted, a numeric value is beyond float64", where=where, key=key,
                            expected="numeric values within 1e-300 .. 1e300 in magnitude") from None
        except NotFinite:
            raise SpecError("with the constants substituted, a value is not a finite real number", where=where,
                            key=key, expected="finite real values",
                            fix="check for division by zero, log(0), sqrt or ** of a negative") from None
        power = largest_integer_power(value) if used else 0  # (x**c)**2 is x**(2*c): 2*c is known only now
        if power > MAX_INTEGER_POWER and not similarity:
            raise SpecError(f"with the constants substituted, an integer power {power} of an expression",
                            where=where, key=key, expected=f"|exponent| <= {MAX_INTEGER_POWER} for an integer power",
                            fix="use a lower power")
        if similarity:
            degree = tensor_degree(value)
            if degree > MAX_SYMBOLIC_POWER:
                raise SpecError(f"the similarity multiplies {degree} dot() factors (constants substituted): a "
                                f"tensor power of feature width d**{degree}", where=where, key=key,
                                expected=f"a tensor degree of at most {MAX_SYMBOLIC_POWER}",
                                fix="use a lower power of dot(q, k)")
        if key == "reweight" and trig_terms(value) > MAX_TRIG_TERMS:  # sympy's trigsimp is exponential in them
            raise SpecError(f"the arguments of sin, cos and tanh hold {trig_terms(value)} terms in all (constants "
                            "substituted)", where=where, key=key, expected=f"at most {MAX_TRIG_TERMS}",
                            fix="use fewer or simpler trigonometric factors, e.g. cos(pi/2 * (i - j) / M)")
        if expanded_terms(value, MAX_TERMS) > MAX_TERMS:
            raise SpecError(f"expanding the expression (products, integer powers of sums, sin/cos of sums) makes "
                            f"more than {MAX_TERMS} terms", where=where, key=key,
                            expected=f"at most {MAX_TERMS} terms", fix="use lower powers or fewer terms")
        return value


def _constants(raw, overrides: dict, causal: bool, where: str) -> tuple:
    if not isinstance(raw, dict):
        raise SpecError(f"found {type(raw).__name__}", where=where, key="constants",
                        expected="a mapping name -> number or expression, e.g. {M: max(n_q, n_k)}")
    if len(raw) > MAX_ENTRIES:
        raise SpecError(f"{len(raw)} constants", where=where, key="constants", expected=f"at most {MAX_ENTRIES}")
    raw = {_key(k): _pick_mode(v, causal, where, f"constants.{_key(k)}") for k, v in raw.items()}
    unknown = set(overrides) - set(raw)
    if unknown:
        raise SpecError(f"unknown override(s) {_listing(unknown)}", where=where,
                        expected="a top-level key (" + ", ".join(KEYS) + ") or a declared constant ("
                        + (", ".join(raw) or "none") + ")")
    raw |= overrides
    out, known, bounds = [], {}, _Bounds()
    for name, value in raw.items():
        key = f"constants.{name}"
        _check_name(name, where, key)
        sym = sympy.Symbol(name, real=True)
        ctx = Context(where, key,
                      {k: v for k, v in BUILTIN_SYMBOLS.items() if k not in ("i", "j")} | known, False,
                      {"i": "constants cannot depend on positions", "j": "constants cannot depend on positions",
                       **{n: "a constant may only use constants declared before it" for n in raw if n not in known}},
                      dict(bounds.numbers))
        if isinstance(value, bool):
            raise SpecError(f"found {value!r}", where=where, key=key, expected="a number or expression")
        expr = parse_value(value, ctx).expr
        depth = 1 + max((bounds.depths[s] for s in expr.free_symbols if s in bounds.depths), default=0)
        if depth > MAX_CONSTANT_DEPTH:
            raise SpecError(f"a chain of {depth} constants each using the one before", where=where, key=key,
                            expected=f"at most {MAX_CONSTANT_DEPTH}", fix="write the value with fewer constants")
        substituted = bounds.check(expr, where, key)
        bounds.values[sym], bounds.depths[sym] = substituted, depth
        bounds.sizes[sym] = tree_size(substituted, {}, MAX_SUBSTITUTED_NODES)
        bounds.calls[sym] = call_depth(substituted, {})
        number = numeric_value(substituted) if substituted.is_number else None  # within float64: checked
        if number is not None:
            bounds.numbers[sym] = number
        source = value if isinstance(value, str) else repr(value)  # after parsing: repr is safe now
        out.append(Constant(name, source, expr, sym))
        known[name] = sym
    return out, bounds


def _parameters(raw, causal: bool, where: str, constants: dict, numbers: dict) -> list:
    if isinstance(raw, (list, dict)) and len(raw) > MAX_ENTRIES:
        raise SpecError(f"{len(raw)} parameters", where=where, key="parameters", expected=f"at most {MAX_ENTRIES}")
    if isinstance(raw, list):  # also accept a list of {name, shape, init}
        items = {}
        for n, item in enumerate(raw):
            if not isinstance(item, dict) or "name" not in item:
                raise SpecError(f"item {n} is not a mapping with a 'name'", where=where, key="parameters")
            _check_name(item["name"], where, f"parameters[{n}].name")
            if item["name"] in items:
                raise SpecError(f"the parameter {item['name']!r} is declared twice", where=where,
                                key=f"parameters[{n}].name", fix="give each parameter its own name")
            items[item["name"]] = {k: v for k, v in item.items() if k != "name"}
        raw = items
    if not isinstance(raw, dict):
        raise SpecError(f"found {type(raw).__name__}", where=where, key="parameters",
                        expected="a mapping name -> {shape: [H] or [], init: expression}")
    out = []
    for name, body in raw.items():
        key = f"parameters.{_key(name)}"
        _check_name(name, where, key)
        if name in constants:
            raise SpecError(f"{name!r} is both a constant and a parameter", where=where, key=key)
        if not isinstance(body, dict):
            body = {"init": body}
        extra = set(map(_key, body)) - {"shape", "init", "learnable", "seed"}
        if extra:
            raise SpecError(f"unknown key(s) {_listing(extra)}", where=where, key=key,
                            expected="shape, init, learnable, seed")
        shape = _shape(body.get("shape", ["H"]), where, f"{key}.shape", constants, numbers)
        if "init" not in body:
            raise SpecError("missing 'init'", where=where, key=key, fix="add e.g. init: 0.5")
        init = _pick_mode(body["init"], causal, where, f"{key}.init")
        if isinstance(init, bool):
            raise SpecError(f"found {init!r}", where=where, key=f"{key}.init", expected="a number or expression")
        learnable = body.get("learnable", True)
        if not isinstance(learnable, bool):
            raise SpecError(f"found {brief(learnable, 40)}", where=where, key=f"{key}.learnable",
                            expected="true (a trained parameter, the default) or false (a fixed tensor)")
        draw, text = _draw(init, shape, where, f"{key}.init")
        seed = body.get("seed", 0)
        if "seed" in body and draw != "normal":
            raise SpecError("a seed without a random init", where=where, key=f"{key}.seed",
                            fix="use init: normal(std) with it, or remove the seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise SpecError(f"seed {brief(seed, 40)}", where=where, key=f"{key}.seed",
                            expected="an integer in [0, 2**63)")
        ctx = Context(where, f"{key}.init", {"h": BUILTIN_SYMBOLS["h"], "H": BUILTIN_SYMBOLS["H"],
                                              "d": BUILTIN_SYMBOLS["d"]}, False, {})
        init_expr = parse_expression(text, ctx) if draw != "eye" else sympy.Integer(1)
        if "H" not in shape and init_expr.has(BUILTIN_SYMBOLS["h"]):
            raise SpecError("a parameter without a head axis uses the head index h in its init", where=where,
                            key=f"{key}.init", fix="declare shape: [H] (or [H, ...]) for a per-head parameter")
        if shape and isinstance(shape[-1], int):
            symbol = Table
        else:
            symbol = (Matrix if isinstance(shape[-2:][0], int) else Elem) if shape[-1:] == ("Dk",) else sympy.Symbol
        out.append(Parameter(name, shape, text if isinstance(text, str) else repr(text), init_expr,
                             symbol(name, real=True), learnable, draw, seed))
    return out


def _shape(raw, where: str, key: str, constants: dict, numbers: dict) -> tuple:
    """A parameter's shape: (), ('H',), ('Dk',), ('H', 'Dk'), (F, 'Dk'), ('H', F, 'Dk') with F an int."""
    if raw in ([], (), None, "scalar"):
        return ()
    if raw in ("H", "[H]"):
        return ("H",)
    bad = SpecError(f"shape {brief(raw, 40)}", where=where, key=key, expected=PARAMETER_SHAPES,
                    fix="e.g. shape: [H, Dk] for a per-head, per-dimension vector")
    if not isinstance(raw, (list, tuple)) or not 1 <= len(raw) <= 3:
        raise bad
    items = list(raw)
    head = items[:1] == ["H"]
    rest = items[1:] if head else items
    if rest == []:
        return ("H",)
    if len(rest) == 1 and rest not in (["Dk"], ["d"]):  # a table [H, NB] or [NB]
        if not (isinstance(rest[0], int) or isinstance(rest[0], str) and rest[0] in constants):
            raise bad
        entries = _size(rest[0], where, key, constants, numbers, "entries", MAX_TABLE,
                        "e.g. shape: [H, 32] (a table per head) or constants: {NB: 32} with shape: [H, NB]")
        return (("H",) if head else ()) + (entries,)
    if rest[-1:] not in (["Dk"], ["d"]):
        raise bad
    if len(rest) == 1:
        return (("H",) if head else ()) + ("Dk",)
    if len(rest) != 2:
        raise bad
    rows = _size(rest[0], where, key, constants, numbers, "rows", MAX_ROWS,
                 "e.g. shape: [64, Dk] or constants: {F: 64} with shape: [F, Dk]")
    return (("H",) if head else ()) + (rows, "Dk")


def _size(raw, where: str, key: str, constants: dict, numbers: dict, what: str, most: int, fix: str) -> int:
    """An integer extent of a shape (rows F of a matrix, entries NB of a table): a literal or a numeric constant."""
    size = raw
    if isinstance(raw, str) and raw in constants:
        value = numbers.get(constants[raw])
        if value is None or value != int(value):
            raise SpecError(f"the constant {raw!r} in the shape is not an integer known at load time", where=where,
                            key=key, expected="an integer constant such as F: 64")
        size = int(value)
    shown = f"{raw} = {size}" if size is not raw else brief(size, 40)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= most:
        raise SpecError(f"{what} {shown}", where=where, key=key,
                        expected=f"an integer in [1, {most}] or the name of a numeric constant", fix=fix)
    return size


def _draw(init, shape: tuple, where: str, key: str) -> tuple:
    """('', init), ('normal', the std's text) or ('eye', 'eye'): how the init makes the tensor."""
    if not isinstance(init, str):
        return "", init
    text = init.strip()
    if text == "eye":
        if shape[-1:] != ("Dk",) or not isinstance(shape[-2:][0], int):
            raise SpecError("init eye needs a matrix parameter", where=where, key=key,
                            expected="shape [F, Dk] or [H, F, Dk]")
        return "eye", "eye"
    if text.startswith("normal(") and text.endswith(")"):
        if shape[-1:] != ("Dk",) and not (shape and isinstance(shape[-1], int)):
            raise SpecError("a random init needs a vector or matrix parameter (or a table)", where=where, key=key,
                            expected="shape [Dk], [H, Dk], [F, Dk], [H, F, Dk], [H, NB] or [NB]",
                            fix="or give a number")
        return "normal", text[len("normal("):-1]
    return "", init


def _normalize(raw, where: str) -> Normalize:
    key = "normalize"
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, dict):
        raise SpecError(f"found {brief(raw)}", where=where, key=key,
                        expected="none, rowsum, softmax, or {kind: rowsum, eps: 1e-6, eps_mode: add|clamp}")
    extra = set(map(_key, raw)) - {"kind", "eps", "eps_mode"}
    if extra:
        raise SpecError(f"unknown key(s) {_listing(extra)}", where=where, key=key, expected="kind, eps, eps_mode")
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

"""Fuzzing the parser and the loader with hypothesis: whatever the input (expression text, whole documents,
Python objects, YAML text), either a valid Spec comes back or an attngen.SpecError; nothing else escapes,
nothing hangs (1 s per example), and no input executes code.

The @example cases are escapes that were found (by hand or by hypothesis) and fixed in expr.py / spec.py."""
import builtins
import contextlib
import os
import subprocess
import time

import pytest
import sympy
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import attngen
from attngen.frontend.expr import HEAD, HEADS, KE, N_K, N_Q, NON_FINITE, QE, D, I, J
from attngen.frontend.spec import KEYS, MAPPING_START, spec_files

# ATTNGEN_FUZZ_EXAMPLES=20000 for a long local run; 250 keeps the suite fast (< 30 s)
FUZZ = settings(max_examples=int(os.environ.get("ATTNGEN_FUZZ_EXAMPLES", "250")), deadline=1000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
M = sympy.Symbol("M", real=True)
PM = sympy.Symbol("m", real=True)
EXPR_KEYS = ["similarity", "reweight", "constants.M", "parameters.m.init"]

SPECS = spec_files()[0].parent  # the built-in specs shipped in the package


def spec_with(key, value):
    """A valid spec (constant M, parameter m) with ``value`` placed at ``key`` (dotted for nested keys)."""
    data = {"name": "fuzz", "similarity": "dot(q, k)", "constants": {"M": 4},
            "parameters": {"m": {"shape": ["H"], "init": 0.5}, "g": {"shape": ["H", "Dk"], "init": 1},
                           "rel": {"shape": ["H", 8], "init": 0},
                           "W": {"shape": [4, "Dk"], "init": "normal(1)", "seed": 3, "learnable": False}}}
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return data
    node[parts[-1]] = value
    return data


def load_or_spec_error(source, **overrides):
    """load_spec; a SpecError is an answer (returned), any other exception fails the test."""
    try:
        return attngen.load_spec(source, **overrides)
    except attngen.SpecError as exc:
        assert str(exc) and exc.where, "a SpecError must say where"
        return exc


def check_valid(spec):
    """What every accepted spec guarantees: finite real sympy math over the declared symbols only."""
    if isinstance(spec, attngen.SpecError):
        return
    assert isinstance(spec, attngen.Spec)
    allowed = {QE, KE, N_Q, N_K, D, HEAD, HEADS} | {c.symbol for c in spec.constants} | {
        p.symbol for p in spec.parameters}
    assert spec.similarity_expr.free_symbols <= allowed, spec.similarity_expr
    assert spec.reweight_expr.free_symbols <= allowed | {I, J}, spec.reweight_expr
    assert not spec.reweight_expr.has(QE, KE)
    for expr in [spec.similarity_expr, spec.reweight_expr, *(c.expr for c in spec.constants),
                 *(p.init_expr for p in spec.parameters)]:
        assert not expr.has(*NON_FINITE), expr
    assert len(spec.hash) == 16


# ---------------------------------------------------------------------------------------------
# (a) expression strings from a grammar of allowed and hostile tokens
# ---------------------------------------------------------------------------------------------
NAMES = ["q", "k", "i", "j", "n", "n_q", "n_k", "d", "h", "H", "pi", "M", "m", "x", "gamma", "__import__",
         "os", "eval", "exec", "open", "__builtins__", "globals", "self", "None", "True", "inf", "nan", "g", "W",
         "Dk", "eye", "normal", "rel", "j - i", "i - j", "t5_bucket(j - i, 8, 20)",
         "lookup(rel, t5_bucket(j - i, 8, 20))"]
FUNCS = ["dot", "norm", "relu", "elu", "exp", "log", "sigmoid", "tanh", "abs", "sqrt", "sin", "cos", "min",
         "max", "__import__", "eval", "getattr", "print", "sum", "softplus", "(lambda x: x)", "q", "1", "mean",
         "matmul", "softmax", "W", "normal", "lookup", "t5_bucket", "rel"]
NUMBERS = ["0", "1", "2", "0.5", "-1", "1e-12", "1e30", "1e31", "1e400", "1e-400", "9" * 50, "1" + "0" * 400,
           "0x1f", "1_000", "1j", "0.0", "-0.0", "2**99", "10**64", ".5", "5.", "1e308", "07", "0b11"]
BINOPS = ["+", "-", "*", "/", "**", "^", "//", "%", "@", "==", "<", ">=", "and", "or", "|", "&", "<<", "in"]
HOSTILE = ["__import__('os').system('x')", "().__class__", "eval('1')", "lambda: 1", "'text'", "b'x'",
           "q.__class__", "q[0]", "[x for x in q]", "{1: 2}", "(1, 2)", "f'{q}'", "x := 1", "*q", "...",
           "not q", "~q", "1 if q else k", "await q", "yield q", "open('/etc/passwd')", "dot(q, k=k)"]


def expressions():
    leaf = st.sampled_from(NAMES) | st.sampled_from(NUMBERS) | st.sampled_from(HOSTILE) | st.integers().map(str) \
        | st.floats(allow_nan=False, allow_infinity=False).map(repr)

    def extend(inner):
        return (st.tuples(inner, st.sampled_from(BINOPS), inner).map(lambda t: f"{t[0]} {t[1]} {t[2]}")
                | st.tuples(st.sampled_from(FUNCS), st.lists(inner, max_size=3)).map(
                    lambda t: f"{t[0]}({', '.join(t[1])})")
                | inner.map(lambda s: f"({s})") | inner.map(lambda s: f"-{s}")
                | inner.map(lambda s: f"{s}.real") | inner.map(lambda s: f"{s}[0]"))
    grammatical = st.recursive(leaf, extend, max_leaves=25)
    tokens = st.lists(st.sampled_from(NAMES + NUMBERS + BINOPS + ["(", ")", "[", "]", ",", ".", "'", ":", " "]),
                      max_size=30).map("".join)
    return grammatical | tokens | st.text(max_size=60)


@FUZZ
@given(text=expressions(), key=st.sampled_from(EXPR_KEYS))
@example(text="1" + "0" * 400 + " * dot(q, k)", key="similarity")  # math.isfinite(int) overflowed
@example(text="dot(relu(q)**sqrt(-1), k)", key="similarity")  # float() of a complex exponent
@example(text="dot(relu(q)**(0**-1), k)", key="similarity")  # zoo exponent
@example(text="dot(q, k)**log(0)", key="similarity")
@example(text="log(0)", key="reweight")  # accepted as zoo before
@example(text="dot(q, k) / 1e-400", key="similarity")  # division by an underflowed 0.0
@example(text="sqrt(-1)", key="constants.M")  # accepted as I before
@example(text="2**2**2**99", key="parameters.m.init")
@example(text="elu(nan)", key="reweight")
def test_expression_text_gives_spec_or_spec_error(text, key):
    check_valid(load_or_spec_error(spec_with(key, text)))


@FUZZ
@given(text=expressions())
def test_expression_text_as_an_override(text):
    check_valid(load_or_spec_error("cosformer", M=text))


# ---------------------------------------------------------------------------------------------
# (b) random documents / Python objects, as whole specs and as the value of each key
# ---------------------------------------------------------------------------------------------
def deep(depth, leaf):
    out = leaf
    for n in range(depth):
        out = [out] if n % 2 else {"causal": out}
    return out


def billion_laughs(levels=25):
    node = ["lol"] * 2
    for _ in range(levels):
        node = [node, node]  # shared references: 2**levels leaves, tiny in memory
    return node


KEY_TEXT = st.sampled_from([*KEYS, "causal", "bidirectional", "kind", "eps", "eps_mode", "shape", "init",
                            "M", "m", "name"]) | st.text(max_size=8)
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.integers(min_value=10 ** 4400, max_value=10 ** 4500) | st.text(max_size=20)
           | st.sampled_from(["dot(q, k)", "rowsum", "none", "softmax", "add", "clamp", "H", "[H]", "scalar",
                              "0.5", "max(n_q, n_k)", "1e-6", "Dk", "[H, Dk]", "eye", "normal(1)", "normal(-1)",
                              "[H, 32]", "exp(lookup(rel, t5_bucket(j - i, 8, 20)))", "lookup(rel, 3)"]))
OBJECTS = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEY_TEXT | st.integers(), inner, max_size=4),
    max_leaves=30)
DEEP = st.builds(deep, st.integers(1, 60), SCALARS)  # hypothesis pretty-prints examples: keep them printable
OBJECTS_WITH_DEEP = OBJECTS | DEEP
PATHS = EXPR_KEYS + ["name", "description", "causal", "normalize", "normalize.kind", "normalize.eps",
                     "normalize.eps_mode", "constants", "parameters", "parameters.m", "parameters.m.shape",
                     "approx", "constants.M.causal", "parameters.W.shape", "parameters.W.init", "parameters.W.seed",
                     "parameters.W.learnable", "parameters.g.shape", "parameters.g.init", "parameters.rel.shape",
                     "parameters.rel.init", "parameters.rel.seed"]


@FUZZ
@given(doc=st.dictionaries(KEY_TEXT | st.integers(), OBJECTS_WITH_DEEP, max_size=8))
@example(doc={"name": "t", "similarity": "dot(q, k)", "parameters": [{"name": [1], "init": 1}]})  # unhashable
@example(doc={10 ** 5000: 1})  # str() of a key beyond the int digit limit
def test_whole_document_gives_spec_or_spec_error(doc):
    check_valid(load_or_spec_error(doc))


PATHOLOGICAL = {  # built here, not drawn by hypothesis, which would pretty-print them (2**25 leaves)
    "deep-list-5000": lambda: deep(5000, "x"),  # repr() recursion in the message
    "deep-mode-mapping-3000": lambda: deep(3000, 1),
    "billion-laughs": billion_laughs,  # repr()/json.dumps walked 2**25 shared leaves
    "int-5000-digits": lambda: 10 ** 5000,  # repr()/str() beyond the int digit limit
    "int-key-5000-digits": lambda: {10 ** 5000: "x", "causal": "1"},
}


@pytest.mark.parametrize("path", PATHS + ["<document>"])
@pytest.mark.parametrize("make", list(PATHOLOGICAL.values()), ids=list(PATHOLOGICAL))
def test_pathological_value_gives_spec_error_quickly(make, path):
    value = make()
    data = {"name": "t", "similarity": "dot(q, k)", "x": value} if path == "<document>" else spec_with(path, value)
    start = time.perf_counter()
    result = load_or_spec_error(data)
    assert time.perf_counter() - start < 1.0
    assert isinstance(result, attngen.SpecError) or path in ("description", "constants.M.causal"), result
    assert len(str(result)) < 2000


@FUZZ
@given(path=st.sampled_from(PATHS), value=OBJECTS_WITH_DEEP)
@example(path="constants.M", value=10 ** 5000)  # repr() of a 5000-digit int
@example(path="causal", value=10 ** 5000)
@example(path="normalize.eps", value=10 ** 5000)
@example(path="name", value=10 ** 5000)
@example(path="parameters.m.shape", value=10 ** 5000)
@example(path="similarity", value={"causal": "dot(q, k)", 10 ** 5000: "x"})
def test_value_of_each_key_gives_spec_or_spec_error(path, value):
    check_valid(load_or_spec_error(spec_with(path, value)))


@FUZZ
@given(name=st.sampled_from(["M", "causal", "similarity", "normalize", "reweight", "x"]), value=OBJECTS)
@example(name="M", value=10 ** 5000)
def test_override_value_gives_spec_or_spec_error(name, value):
    check_valid(load_or_spec_error("cosformer", **{name: value}))


# ---------------------------------------------------------------------------------------------
# (c) random text through YAML
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(text=st.text(max_size=200) | expressions(), key=st.sampled_from(["similarity", "reweight", "name",
                                                                       "normalize", "description"]))
def test_text_dumped_to_yaml_gives_spec_or_spec_error(text, key):
    document = yaml.safe_dump({"name": "fuzz", "similarity": "dot(q, k)", key: text})
    result = load_or_spec_error(document)
    check_valid(result)
    if isinstance(result, attngen.SpecError):
        assert result.where == "<yaml string>"


YAML_TOKENS = ["a: 1", "similarity: dot(q, k)", "- ", ": ", "{", "}", "[", "]", "&a ", "*a",
               "!!python/object:os.system", "!!binary", "? ", "|", ">", "'", '"', "#", "\t", "  ", "1" + "0" * 5000,
               "causal:", "!!set", "<<: *a", "---", "...", "%YAML 1.1", "normalize: {kind: rowsum, eps: ",
               "!!float nan", "\n"]


@FUZZ
@given(text=st.lists(st.sampled_from(YAML_TOKENS), max_size=25).map("".join) | st.text(max_size=200))
@example(text="eps: 1" + "0" * 5000)  # PyYAML's int() raised ValueError (digit limit)
@example(text="a: " + "[" * 3000 + "]" * 3000)
@example(text="!!python/object/apply:os.system ['echo pwned']")
def test_raw_yaml_text_gives_spec_or_spec_error(text):
    check_valid(load_or_spec_error(text + "\n"))


@FUZZ
@given(text=st.text(max_size=300))
@example(text="x" * 5000)  # Path.exists raised OSError: file name too long
@example(text="a\x00b")
@example(text="0.\x00")  # read_text raised ValueError: embedded null byte
@example(text="")  # Path("") is ".", a directory: the message had an empty 'where'
@example(text="/etc/passwd")  # was read as a file, and its lines quoted in the message
@example(text="/dev/zero")
@example(text="/dev/zero.yaml")
@example(text=".")
def test_single_line_text_is_a_name_yaml_text_or_a_yaml_path(text):
    text = text.replace("\n", " ")
    result = load_or_spec_error(text)
    is_yaml_path = text.strip().lower().endswith((".yaml", ".yml")) and os.path.isfile(text)
    assert isinstance(result, attngen.SpecError) or text in attngen.builtin_names() or is_yaml_path \
        or MAPPING_START.match(text), text


# ---------------------------------------------------------------------------------------------
# (d) no input executes code
# ---------------------------------------------------------------------------------------------
HOSTILE_PROGRAMS = [
    "__import__('os').system('touch /tmp/attngen-pwned')",
    "().__class__.__bases__[0].__subclasses__()",
    "eval('1')", "exec('x = 1')", "open('/etc/passwd').read()", "compile('1', 'x', 'eval')",
    "(lambda: __import__('os'))()", "[c for c in ().__class__.__base__.__subclasses__()]",
    "globals()['__builtins__']", "getattr(q, '__class__')", "breakpoint()", "input()",
    "sympify('x')", "S('x')", "Symbol('x')", "q.__init__.__globals__", "f\"{__import__('os')}\"",
    "import os", "exit()", "__builtins__.eval('1')", "dot(q, k) if __import__('os') else 1",
]


class Sentinel:
    """Records (and blocks) eval, exec, open, non-AST compile, imports of os/subprocess, os.system."""

    def __init__(self):
        self.calls = []

    def blocker(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args[:1]))
            raise RuntimeError(f"sentinel: {name} was called")
        return call

    @contextlib.contextmanager
    def armed(self):
        real_compile, real_import = builtins.compile, builtins.__import__

        def guarded_compile(source, filename, mode, flags=0, *args, **kwargs):
            if not flags & 0x400:  # ast.PyCF_ONLY_AST: ast.parse only builds a tree; anything else is code
                self.calls.append(("compile", (source,)))
                raise RuntimeError("sentinel: compile to code")
            return real_compile(source, filename, mode, flags, *args, **kwargs)

        def guarded_import(name, *args, **kwargs):
            if name.split(".")[0] in ("os", "subprocess", "shutil", "socket"):
                self.calls.append(("import", (name,)))
            return real_import(name, *args, **kwargs)

        patches = {(builtins, "eval"): self.blocker("eval"), (builtins, "exec"): self.blocker("exec"),
                   (builtins, "open"): self.blocker("open"), (builtins, "compile"): guarded_compile,
                   (builtins, "__import__"): guarded_import, (builtins, "breakpoint"): self.blocker("breakpoint"),
                   (builtins, "input"): self.blocker("input"), (os, "system"): self.blocker("os.system"),
                   (subprocess, "Popen"): self.blocker("Popen")}
        saved = {target: getattr(*target) for target in patches}
        try:
            for (obj, attr), fake in patches.items():
                setattr(obj, attr, fake)
            yield self
        finally:
            for (obj, attr), real in saved.items():
                setattr(obj, attr, real)


def load_under_sentinel(data):
    sentinel = Sentinel()
    with sentinel.armed():
        try:
            result = attngen.load_spec(data)
        except attngen.SpecError as exc:
            result = exc
    return result, sentinel.calls


def test_sentinel_catches_what_it_guards():
    sentinel = Sentinel()
    with sentinel.armed():
        with pytest.raises(RuntimeError):
            eval("1")
        with pytest.raises(RuntimeError):
            os.system("true")
        __import__("os")
    assert [c[0] for c in sentinel.calls] == ["eval", "os.system", "import"]
    assert eval("1 + 1") == 2  # restored


@pytest.mark.parametrize("key", EXPR_KEYS)
@pytest.mark.parametrize("program", HOSTILE_PROGRAMS)
def test_hostile_program_is_refused_without_running(program, key):
    attngen.load_spec(spec_with(key, "1"))  # warm sympy's lazy imports outside the sentinel
    result, calls = load_under_sentinel(spec_with(key, program))
    assert calls == []
    assert isinstance(result, attngen.SpecError), result
    assert not os.path.exists("/tmp/attngen-pwned")


@FUZZ
@given(text=expressions(), key=st.sampled_from(EXPR_KEYS))
def test_no_fuzzed_expression_runs_code(text, key):
    result, calls = load_under_sentinel(spec_with(key, text))
    assert calls == []
    check_valid(result)


def test_valid_specs_load_under_the_sentinel():
    # the sentinel does not itself break parsing: every built-in still loads with it armed
    for name in attngen.builtin_names():
        text = (SPECS / f"{name}.yaml").read_text()
        attngen.load_spec(text)  # warm sympy's lazy imports outside the sentinel
        spec, calls = load_under_sentinel(text)
        assert calls == [] and isinstance(spec, attngen.Spec) and spec.name == name

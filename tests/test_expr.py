"""The restricted expression parser: what each key accepts (as sympy forms), and every way an expression is
refused: a SpecError naming the file, the key, the offending sub-expression and what was expected."""
import time

import pytest
import sympy
import yaml

import attngen
from attngen.frontend.expr import (
    BUILTIN_SYMBOLS,
    HEAD,
    HEADS,
    KE,
    MAX_DEPTH,
    MAX_NODES,
    MAX_SOURCE_CHARS,
    N_K,
    N_Q,
    QE,
    Context,
    D,
    Dot,
    Elu,
    I,
    J,
    Norm,
    Relu,
    Sigmoid,
    outer_free_symbols,
    parse_expression,
    sides,
)

M = sympy.Symbol("M", real=True)
GAMMA = sympy.Symbol("gamma", real=True)
PM = sympy.Symbol("m", real=True)


def spec_dict(similarity="dot(q, k)", **keys):
    """A minimal valid spec with one constant M and one per-head parameter m, plus ``keys``."""
    base = {"name": "t", "similarity": similarity, "constants": {"M": 64},
            "parameters": {"m": {"shape": ["H"], "init": 0.5}}}
    base.update(keys)
    return base


def load_file(tmp_path, data):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, attngen.load_spec(path)


# ---------------------------------------------------------------------------------------------
# What parses, and into which sympy form
# ---------------------------------------------------------------------------------------------
SIMILARITIES = [
    ("dot", "dot(q, k)", Dot(QE, KE)),
    ("relu-features", "dot(relu(q), relu(k))", Dot(Relu(QE), Relu(KE))),
    ("elu-plus-one", "dot(elu(q) + 1, elu(k) + 1)", Dot(Elu(QE) + 1, Elu(KE) + 1)),
    ("cosine", "dot(q, k) / (norm(q) * norm(k))", Dot(QE, KE) / (Norm(QE) * Norm(KE))),
    ("cosine-clamped", "dot(q, k) / (max(norm(q), 1e-12) * max(norm(k), 1e-12))",
     Dot(QE, KE) / (sympy.Max(Norm(QE), sympy.Float(1e-12)) * sympy.Max(Norm(KE), sympy.Float(1e-12)))),
    ("row-normalised-vector", "dot(q / norm(q), k)", Dot(QE / Norm(QE), KE)),
    ("squared", "(dot(q, k)/sqrt(d))**2", Dot(QE, KE) ** 2 / D),
    ("taylor", "1 + dot(q, k)/sqrt(d) + (dot(q, k)/sqrt(d))**2 / 2",
     1 + Dot(QE, KE) / sympy.sqrt(D) + Dot(QE, KE) ** 2 / (2 * D)),
    ("softmax", "exp(dot(q, k)/sqrt(d))", sympy.exp(Dot(QE, KE) / sympy.sqrt(D))),
    ("elementwise-power", "dot(q**2, k**2)", Dot(QE ** 2, KE ** 2)),
    ("maps-mixed", "dot(exp(q), sigmoid(k))", Dot(sympy.exp(QE), Sigmoid(KE))),
    ("min-max-broadcast", "dot(max(q, 0), min(k, 1))", Dot(sympy.Max(QE, 0), sympy.Min(KE, 1))),
    ("tanh-abs", "dot(2*tanh(q), abs(k))", Dot(2 * sympy.tanh(QE), sympy.Abs(KE))),
    ("sin-cos", "dot(sin(q), cos(k))", Dot(sympy.sin(QE), sympy.cos(KE))),
    ("log", "dot(log(1 + exp(q)), k)", Dot(sympy.log(1 + sympy.exp(QE)), KE)),
    ("constant-broadcast", "dot(q * M + d, k)", Dot(QE * M + D, KE)),
    ("parameter-scale", "m * dot(q, k)", PM * Dot(QE, KE)),
    ("unary", "-(+dot(q, k))", -Dot(QE, KE)),
    ("numeric-power-folds", "2**-3 * dot(q, k)", sympy.Rational(1, 8) * Dot(QE, KE)),
    ("pi", "pi * dot(q, k)", sympy.pi * Dot(QE, KE)),
    ("n-is-n_k", "dot(q, k) / n", Dot(QE, KE) / N_K),
    ("number", "3", sympy.Integer(3)),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in SIMILARITIES], ids=[c[0] for c in SIMILARITIES])
def test_similarity_parses_to(text, expected):
    spec = attngen.load_spec(spec_dict(text))
    assert sympy.simplify(spec.similarity_expr - expected) == 0, spec.similarity_expr


REWEIGHTS = [
    ("cosformer", "cos(pi/2 * (i - j) / M)", sympy.cos(sympy.pi * (I - J) / (2 * M))),
    ("decay", "0.9**abs(i - j)", sympy.Float(0.9) ** sympy.Abs(I - J)),
    ("toeplitz", "1/(1 + abs(i - j))", 1 / (1 + sympy.Abs(I - J))),
    ("cottention-causal", "(j + 1)**(-sigmoid(m))", (J + 1) ** (-Sigmoid(PM))),
    ("lengths-and-heads", "n_q / n_k + h / H + d", N_Q / N_K + HEAD / HEADS + D),
    ("constant-one", "1", sympy.Integer(1)),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in REWEIGHTS], ids=[c[0] for c in REWEIGHTS])
def test_reweight_parses_to(text, expected):
    spec = attngen.load_spec(spec_dict(reweight=text))
    assert sympy.simplify(spec.reweight_expr - expected) == 0, spec.reweight_expr


def test_constants_and_init_parse():
    spec = attngen.load_spec(spec_dict(constants={"M": "max(n_q, n_k)", "gamma": "1 - 2**(-5 - h)"},
                                       parameters={"slope": {"shape": ["H"], "init": "2**(-8*(h + 1)/H)"}}))
    values = spec.constant_values()
    assert values[M] == sympy.Max(N_Q, N_K)
    assert sympy.simplify(values[GAMMA] - (1 - 2 ** (-5 - HEAD))) == 0
    (slope,) = spec.parameters
    assert sympy.simplify(slope.init_expr - 2 ** (-8 * (HEAD + 1) / HEADS)) == 0


def test_a_constant_may_use_an_earlier_constant():
    spec = attngen.load_spec(spec_dict(constants={"A": "n_q + 1", "B": "2 * A"}))
    values = {c.name: v for c, v in zip(spec.constants, spec.constant_values().values())}
    assert values["B"] == 2 * (N_Q + 1)


def test_parse_expression_directly_and_helpers():
    ctx = Context("<test>", "similarity", {"d": D}, True, {})
    expr = parse_expression("dot(relu(q), k) * norm(q) / d", ctx)
    assert sides(expr) == {"q", "k"}
    assert outer_free_symbols(expr) == {D}  # the element symbols inside Dot/Norm are bound
    assert sides(parse_expression("norm(q)", ctx)) == {"q"}
    assert parse_expression(2.5, ctx) == sympy.Float(2.5)


def test_builtin_symbols_are_the_documented_ones():
    assert set(BUILTIN_SYMBOLS) == {"i", "j", "n_q", "n_k", "n", "d", "h", "H"}
    assert BUILTIN_SYMBOLS["n"] is N_K


# ---------------------------------------------------------------------------------------------
# Errors: each names the file, the key, the offending sub-expression and the expectation or fix
# ---------------------------------------------------------------------------------------------
# (id, spec keys, key named, offending sub-expression, expectation/fix fragments)
EXPR_ERRORS = [
    ("unknown-name", {"similarity": "dot(q, z)"}, "similarity", "'z'",
     ["unknown symbol 'z'", "expected one of", "declare it under 'constants' or 'parameters'"]),
    ("arity-dot", {"similarity": "dot(q)"}, "similarity", "'dot(q)'", ["takes 2 argument(s), got 1"]),
    ("arity-relu", {"similarity": "dot(relu(q, k), k)"}, "similarity", "'relu(q, k)'",
     ["takes 1 argument(s), got 2"]),
    ("arity-max", {"similarity": "dot(max(q), k)"}, "similarity", "'max(q)'", ["takes 2 argument(s), got 1"]),
    ("unknown-function", {"similarity": "dot(softplus(q), k)"}, "similarity", "'softplus(q)'",
     ["unknown function 'softplus'", "expected one of abs, cos, dot"]),
    ("vector-not-scalar", {"similarity": "relu(q)"}, "similarity", "'relu(q)'",
     ["is a vector", "expected a scalar", "Fix: reduce it with dot(a, b) or norm(a)"]),
    ("vector-plus-position", {"similarity": "dot(relu(q) + i, k)"}, "similarity", "'i'",
     ["not allowed here", "positions belong in 'reweight'"]),
    ("q-in-reweight", {"reweight": "exp(q)"}, "reweight", "'q'",
     ["the vector 'q' is not allowed here", "Fix: q and k may appear only in 'similarity'"]),
    ("norm-in-reweight", {"reweight": "norm(n)"}, "reweight", "'norm(n)'",
     ["not allowed here", "apply to the vectors q and k in 'similarity'"]),
    ("i-in-similarity", {"similarity": "i * dot(q, k)"}, "similarity", "'i'", ["positions belong in 'reweight'"]),
    ("j-in-similarity", {"similarity": "dot(q, k) + j"}, "similarity", "'j'", ["positions belong in 'reweight'"]),
    ("caret-as-power", {"similarity": "dot(q, k)^2"}, "similarity", "'dot(q, k)^2'",
     ["'^' is not a power", "expected '**' for powers", "Fix: write a**b"]),
    ("attribute", {"similarity": "q.T"}, "similarity", "'q.T'",
     ["Attribute syntax is not allowed", "expected numbers, names"]),
    ("dunder-attribute", {"similarity": "().__class__"}, "similarity", "'().__class__'",
     ["Attribute syntax is not allowed"]),
    ("subscript", {"similarity": "dot(q[0], k)"}, "similarity", "'q[0]'", ["Subscript syntax is not allowed"]),
    ("lambda", {"similarity": "lambda x: x"}, "similarity", "'lambda x: x'", ["Lambda syntax is not allowed"]),
    ("list-comprehension", {"similarity": "[x for x in q]"}, "similarity", "'[x for x in q]'",
     ["ListComp syntax is not allowed"]),
    ("generator-call", {"similarity": "max(x for x in q)"}, "similarity", "'(x for x in q)'",
     ["GeneratorExp syntax is not allowed"]),
    ("unknown-vector-function", {"similarity": "dot(log_softmax(q), k)"}, "similarity", "'log_softmax(q)'",
     ["unknown function 'log_softmax'", "matmul", "softmax"]),
    ("string-literal", {"similarity": "'dot(q, k)'"}, "similarity", "'dot(q, k)'",
     ["is not a number", "expected an int or float literal"]),
    ("keyword-argument", {"similarity": "dot(relu(x=q), k)"}, "similarity", "'relu(x=q)'",
     ["keyword arguments are not allowed", "expected positional arguments"]),
    ("called-attribute", {"similarity": "__import__('os').system('x')"}, "similarity", "__import__('os')",
     ["only plain function names can be called"]),
    ("eval-call", {"similarity": "eval('1')"}, "similarity", "eval('1')", ["unknown function 'eval'"]),
    ("floordiv", {"similarity": "dot(q, k) // 2"}, "similarity", "'dot(q, k) // 2'",
     ["operator FloorDiv is not allowed", "expected + - * / **"]),
    ("modulo", {"similarity": "dot(q, k) % 2"}, "similarity", "'dot(q, k) % 2'", ["operator Mod is not allowed"]),
    ("matmul", {"similarity": "q @ k"}, "similarity", "'q @ k'", ["operator MatMult is not allowed"]),
    ("comparison", {"similarity": "dot(q, k) > 0"}, "similarity", "'dot(q, k) > 0'",
     ["Compare syntax is not allowed"]),
    ("boolean-op", {"similarity": "dot(q, k) and 1"}, "similarity", "'dot(q, k) and 1'",
     ["BoolOp syntax is not allowed"]),
    ("conditional", {"similarity": "1 if q else 2"}, "similarity", "'1 if q else 2'", ["IfExp syntax"]),
    ("tuple", {"similarity": "(1, 2)"}, "similarity", "'(1, 2)'", ["Tuple syntax is not allowed"]),
    ("walrus", {"similarity": "(x := 1)"}, "similarity", "'x := 1'", ["NamedExpr syntax is not allowed"]),
    ("f-string", {"similarity": "f'{q}'"}, "similarity", "f'{q}'", ["JoinedStr syntax is not allowed"]),
    ("starred", {"similarity": "dot(*q)"}, "similarity", "'*q'", ["Starred syntax is not allowed"]),
    ("dot-of-scalar", {"similarity": "dot(1, k)"}, "similarity", "'dot(1, k)'",
     ["got a scalar argument", "expected vector arguments"]),
    ("vector-exponent", {"similarity": "dot(2**q, k)"}, "similarity", "'2**q'",
     ["the exponent is a vector", "expected a scalar exponent"]),
    ("tensor-power-too-large", {"similarity": "dot(q, k)**9"}, "similarity", "'dot(q, k)**9'",
     ["power 9 of a q/k expression is too large", "|exponent| <= 8"]),
    ("division-by-zero", {"similarity": "dot(q, k) / (d - d)"}, "similarity", "'dot(q, k) / (d - d)'",
     ["division by zero"]),
    ("log-of-zero", {"reweight": "log(0) + 1"}, "reweight", "'log(0)'",
     ["is not a finite real number", "Fix: check for division by zero, log(0)"]),
    ("sqrt-of-negative", {"similarity": "sqrt(-1) * dot(q, k)"}, "similarity", "'sqrt(-1)'",
     ["not a finite real number"]),
    ("zero-to-negative", {"similarity": "dot(relu(q)**(0**-1), k)"}, "similarity", "'0**-1'",
     ["not a finite real number"]),
    ("huge-float-literal", {"similarity": "1e400 * dot(q, k)"}, "similarity", "'1e400'",
     ["out of range", "|x| <= 1e+30"]),
    ("huge-int-literal", {"similarity": "1" + "0" * 40 + " * dot(q, k)"}, "similarity", "'1" + "0" * 40,
     ["out of range", "|x| <= 1e+30"]),
    ("huge-folded-power", {"similarity": "10**400 * dot(q, k)"}, "similarity", "'10**400'",
     ["would be huge", "|exponent| <= 64", "Fix: write the value as a decimal literal"]),
    ("empty", {"similarity": "  "}, "similarity", "empty", ["expected an expression such as"]),
    ("not-text", {"similarity": None}, "similarity", "None",
     ["expected an expression string or a number", "Fix: write the expression as a string"]),
    ("constant-uses-position", {"constants": {"M": "i + 1"}}, "constants.M", "'i'",
     ["constants cannot depend on positions"]),
    ("constant-uses-later-constant", {"constants": {"A": "B + 1", "B": 2}}, "constants.A", "'B'",
     ["a constant may only use constants declared before it"]),
    ("init-uses-q", {"parameters": {"m": {"init": "q"}}}, "parameters.m.init", "'q'",
     ["not allowed here", "Fix: q and k may appear only in 'similarity'"]),
    ("init-uses-position", {"parameters": {"m": {"init": "i"}}}, "parameters.m.init", "'i'",
     ["unknown symbol 'i'", "expected one of H, d, h, pi"]),
]


@pytest.mark.parametrize("keys,key,sub,hints", [c[1:] for c in EXPR_ERRORS], ids=[c[0] for c in EXPR_ERRORS])
def test_expression_error_names_file_key_subexpression_and_fix(tmp_path, keys, key, sub, hints):
    with pytest.raises(attngen.SpecError) as info:
        load_file(tmp_path, spec_dict(**keys))
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "bad.yaml") + ": " + key + ":"), msg
    assert sub in msg, msg
    for hint in hints:
        assert hint in msg, msg
    assert info.value.key == key


# ---------------------------------------------------------------------------------------------
# Limits: hostile input is refused quickly, never folded, never a RecursionError
# ---------------------------------------------------------------------------------------------
LIMITS = [
    ("power-tower", "2**2**2**99", "would be huge"),
    ("power-tower-short", "2**2**2**2**2", "would be huge"),
    ("float-power", "2.0**1e20", "would be huge"),
    ("overflowing-power", "9.0**400", "would be huge"),
    ("parens-1000-deep", "(" * 1000 + "1" + ")" * 1000, f"at most {MAX_SOURCE_CHARS}"),
    ("parens-600-deep", "(" * 600 + "1" + ")" * 600, "too many nested parentheses"),
    ("unary-minus-10000", "-" * 10000 + "1", f"at most {MAX_SOURCE_CHARS}"),
    ("unary-minus-1999", "-" * 1999 + "1", f"at most {MAX_NODES}"),
    ("unary-minus-41", "-" * (MAX_DEPTH + 1) + "1", f"at most {MAX_DEPTH} levels"),
    ("calls-45-deep", "dot(" + "relu(" * 45 + "q" + ")" * 45 + ", k)", f"at most {MAX_DEPTH} levels"),
    ("over-long", "dot(q, k)" + " + 1" * 600, f"at most {MAX_SOURCE_CHARS}"),
    ("many-nodes", "+".join(["1"] * 300), f"at most {MAX_NODES}"),
    ("exp-of-huge-float", "exp(exp(1e30)) * dot(q, k)", "cannot be applied"),
]


@pytest.mark.parametrize("text,fragment", [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS])
def test_hostile_expression_is_refused_within_a_second(text, fragment):
    start = time.perf_counter()
    with pytest.raises(attngen.SpecError) as info:
        attngen.load_spec(spec_dict(text))
    assert time.perf_counter() - start < 1.0
    assert fragment in str(info.value)
    assert str(info.value).startswith("<dict>: similarity:")


@pytest.mark.parametrize("key", ["similarity", "reweight", "constants.M", "parameters.m.init"])
def test_limits_apply_to_every_expression_key(key):
    text = "2**2**2**99"
    data = spec_dict()
    if key == "constants.M":
        data["constants"] = {"M": text}
    elif key == "parameters.m.init":
        data["parameters"] = {"m": {"init": text}}
    else:
        data[key] = text
    start = time.perf_counter()
    with pytest.raises(attngen.SpecError, match=f"{key}: in '2\\*\\*99'"):
        attngen.load_spec(data)
    assert time.perf_counter() - start < 1.0


def test_parentheses_alone_do_not_nest_the_tree():
    # 150 redundant parentheses are one literal to the parser: accepted, and the value is kept
    spec = attngen.load_spec(spec_dict("(" * 150 + "dot(q, k)" + ")" * 150))
    assert spec.similarity_expr == Dot(QE, KE)


@pytest.mark.parametrize("value,fragment", [(10 ** 5000, "an integer of about 5000 digits"),
                                            (float("nan"), "nan"), (float("inf"), "inf")],
                         ids=["int-5000-digits", "nan", "inf"])
def test_non_string_numbers_out_of_range(value, fragment):
    with pytest.raises(attngen.SpecError) as info:
        attngen.load_spec(spec_dict(constants={"M": value}))
    msg = str(info.value)
    assert msg.startswith("<dict>: constants.M: number " + fragment) and "out of range" in msg, msg

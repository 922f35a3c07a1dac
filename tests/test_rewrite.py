"""Every rewrite rule: its result has the intended form AND equals its input, symbolically (with dot and
norm written out over an explicit 3-dim head) and numerically at random points."""
import random

import pytest
import sympy

import attngen
import attngen.frontend.expr
from attngen.frontend.expr import KE, N_K, N_Q, QE, Dot, I, J, Norm
from attngen.ir import ReweightClass
from attngen.passes.rewrite import (
    CAUSAL_REWEIGHT_RULES,
    SEPARATION_RULES,
    SIMILARITY_RULES,
    T_DIFF,
    classify_reweight,
    classify_similarity,
)

RULES = {r.name: r for r in SIMILARITY_RULES + CAUSAL_REWEIGHT_RULES + SEPARATION_RULES}
DIM = 3
QS = sympy.symbols("q0:3", real=True)
KS = sympy.symbols("k0:3", real=True)


def explicit(expr):
    """Write Dot and Norm out as sums over a 3-dim head, so sympy can compare the forms."""
    def elem(e, n):
        return e.xreplace({QE: QS[n], KE: KS[n]})
    # reductions first (a Norm inside a dot's argument is a row scalar, not an element)
    expr = expr.replace(lambda e: isinstance(e, Norm),
                        lambda e: sympy.sqrt(sum(elem(e.args[0], n) ** 2 for n in range(DIM))))
    return expr.replace(lambda e: isinstance(e, Dot),
                        lambda e: sum(elem(e.args[0], n) * elem(e.args[1], n) for n in range(DIM)))


def numeric_points(expr, count=20, causal=False, seed=0):
    rng = random.Random(seed)
    for _ in range(count):
        i, j = rng.randint(0, 50), rng.randint(0, 50)
        if causal and j > i:
            i, j = j, i
        values = {s: rng.uniform(-2, 2) for s in QS + KS}
        values |= {I: i, J: j, N_Q: rng.randint(51, 80), N_K: rng.randint(51, 80)}
        values |= {s: rng.uniform(0.1, 0.9) for s in expr.free_symbols if s not in values}
        yield values


def assert_equal(before, after, causal=False):
    b, a = explicit(before), explicit(after)
    if not causal:  # causal-abs holds on j <= i only: checked numerically there
        assert sympy.simplify(b - a) == 0, (before, after)
    for point in numeric_points(b + a, causal=causal):
        vb, va = complex(b.evalf(subs=point)), complex(a.evalf(subs=point))
        assert abs(vb - va) <= 1e-9 * max(1.0, abs(vb)), (before, after, point)


def sim(text, **consts):
    spec = attngen.load_spec({"name": "t", "similarity": text, "constants": consts})
    return spec.similarity_expr.xreplace(spec.constant_values())


def weight(text, causal=True, **consts):
    spec = attngen.load_spec({"name": "t", "similarity": "dot(q,k)", "reweight": text, "causal": causal,
                              "constants": consts})
    return spec.reweight_expr.xreplace(spec.constant_values())


def test_pull_row_scalars_cosine():
    before = sim("dot(q/max(norm(q), 1e-12), 2*k/max(norm(k), 1e-12))")
    after = RULES["pull-row-scalars"].apply(before)
    dots = list(after.atoms(Dot))
    assert dots == [Dot(QE, KE)]  # the row scalars left the dot product
    assert after.has(Norm(QE)) and after.has(Norm(KE))
    assert_equal(before, after)


def test_pull_row_scalars_keeps_the_other_side_inside():
    """In dot(q*k, q) the factor k varies along the head dim: it is not a row scalar of the q side."""
    before = sim("dot(q*k, q)")
    after = RULES["pull-row-scalars"].apply(before)
    assert after == before
    assert_equal(before, after)


@pytest.mark.parametrize("text,terms", [
    ("1 + dot(q,k)/sqrt(d) + (dot(q,k)/sqrt(d))**2/2", 3),
    ("(dot(q,k) + dot(relu(q), relu(k)))**2", 3),
    ("(1 + dot(q,k))*(2 + norm(q))", 4),
])
def test_expand_products(text, terms):
    before = sim(text)
    after = RULES["expand-products"].apply(before)
    assert len(sympy.Add.make_args(after)) == terms
    assert_equal(before, after)


def test_expand_products_keeps_element_formulas_whole():
    after = RULES["expand-products"].apply(sim("dot(elu(q) + 1, elu(k) + 1)"))
    assert after == Dot(attngen.frontend.expr.Elu(QE) + 1, attngen.frontend.expr.Elu(KE) + 1)


@pytest.mark.parametrize("text", ["gamma**abs(i - j)", "exp(-s*abs(j - i))", "1/(1 + abs(i - j))"])
def test_causal_abs(text):
    before = weight(text, gamma=0.9, s=0.3)
    after = RULES["causal-abs"].apply(before)
    assert not after.has(sympy.Abs)
    assert_equal(before, after, causal=True)


@pytest.mark.parametrize("text,terms", [
    ("cos(pi/2*(i - j)/M)", 2),
    ("sin(i - j)", 2),
    ("cos(i - j) + sin(2*(i - j))", 4),
    ("exp(i/n_q - j/n_k)", 1),
])
def test_expand_trig_separates(text, terms):
    before = weight(text, causal=False, M="max(n_q, n_k)")
    after = RULES["expand-trig"].apply(before)
    parts = sympy.Add.make_args(after)
    assert len(parts) == terms
    for p in parts:
        assert sympy.separatevars(p, symbols=[I, J], dict=True) is not None
    assert_equal(before, after)


def test_every_rule_is_tested():
    tested = {"pull-row-scalars", "expand-products", "causal-abs", "expand-trig"}
    assert set(RULES) == tested


# -- separation and classification (whole passes) -----------------------------------------------
def test_separation_reassembles_the_similarity():
    steps = []
    expr = sim("dot(q, k)/(max(norm(q), 1e-12)*max(norm(k), 1e-12)) + (dot(q,k)/sqrt(d))**2")
    s = classify_similarity(expr, steps)
    rebuilt = 0
    for t in s.terms:
        prod = sympy.Mul(*[Dot(a, b) for a, b in zip(t.q_factors, t.k_factors)])
        rebuilt += t.coeff * t.q_scale * t.k_scale * prod
    assert_equal(expr, rebuilt)


@pytest.mark.parametrize("text,causal", [("cos(pi/2*(i - j)/M)", True), ("cos(pi/2*(i - j)/M)", False),
                                         ("(j + 1)**(-0.5)", True), ("0.9**abs(i - j) * cos(i - j)", False)])
def test_reweight_terms_reassemble(text, causal):
    expr = weight(text, causal=causal, M="max(n_q, n_k)")
    rw = classify_reweight(expr, causal, [], "<test>")
    rebuilt = sum(t.coeff * t.f_i * t.g_j for t in rw.terms)
    if rw.decay is not None:
        diff = sympy.Abs(I - J) if rw.decay.two_sided else (I - J)
        rebuilt = rebuilt * rw.decay.gamma ** diff
    assert_equal(expr, rebuilt, causal=causal)


def test_toeplitz_kernel_matches():
    expr = weight("1/(1 + abs(i - j))", causal=False)
    rw = classify_reweight(expr, False, [], "<test>")
    assert rw.kind is ReweightClass.TOEPLITZ
    for point in numeric_points(expr):
        t = point[I] - point[J]
        assert float(rw.kernel.subs(T_DIFF, t)) == pytest.approx(float(expr.subs(point)), rel=1e-12)

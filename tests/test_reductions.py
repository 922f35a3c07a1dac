"""Parameter gradients that are long reductions, in float32 on the torch backend, under verify's three-way rule.

ALiBi's dslope_h = -sum_ij dS_ij |i - j| sums T^2 terms whose rows cancel (sum_j dS_ij = 0: O is invariant to
scaling a row of A); its condition number reaches 1e3..1e4 at T = 63. `attngen build --all` failed on alibi
causal float32 T = 63 (seed 63): dslope 1.5e-5 against the tolerance 1e-5. The cause: autograd of num / den took
the row term of the normalisation's backward from dO . (A V) while dA used dO . V_j rounded separately, so the
rows of dS did not cancel in float32, and the residue, weighted by |i - j|, summed into dslope. The quadratic
ordering now normalises through RowNormalize (the row term from the same products, in float64) and evaluates the
reweighting in float64 (so the (i, j) sum of a parameter's gradient is accumulated in float64); the naive
reference folds W = exp(w) into the softmax's exponent (its float32 run, the rule's yardstick, overflowed at
T = 1000 for a negative slope and failed every quantity).
"""
import pytest
import torch

import attngen
from attngen.naive import reference
from attngen.runtime.torch import quadratic
from attngen.verify import verify_case

GAMMA = {"name": "retention_learned", "similarity": "dot(q, k) / sqrt(d)", "reweight": "sigmoid(x)**abs(i - j)",
         "normalize": "none", "parameters": {"x": {"shape": ["H"], "init": 2.2}}}
SIGMOID = {"name": "sigmoid_attn", "similarity": "sigmoid(dot(q, k)/sqrt(d) - b)", "normalize": "none",
           "parameters": {"b": {"shape": [], "init": 1.0}}}
DECAYED_SOFTMAX = {"name": "softmax_learned_decay", "similarity": "exp(dot(q, k) / sqrt(d))",
                   "reweight": "sigmoid(x)**abs(i - j)", "normalize": "rowsum",
                   "parameters": {"x": {"shape": ["H"], "init": 2.2}}}
WINDOWED_SOFTMAX = {"name": "softmax_sigmoid_window", "similarity": "exp(dot(q, k) / sqrt(d))",
                    "reweight": "sigmoid(b - abs(i - j))", "normalize": "rowsum",
                    "parameters": {"b": {"shape": ["H"], "init": 4.0}}}
# each with a learnable parameter whose gradient sums over every (i, j): ALiBi's slope, Cottention's m, a learnable
# decay (retention-like, and inside a softmax where it folds into the score), sigmoid attention's bias, and a
# softmax reweighted by a non-foldable window sigmoid(b - |i - j|)
SIBLINGS = {"alibi": "alibi", "cottention": "cottention", "gamma": GAMMA, "sigmoid": SIGMOID,
            "decayed_softmax": DECAYED_SOFTMAX, "windowed_softmax": WINDOWED_SOFTMAX}
MODES = ("causal", "bidirectional")


def _verify(name, mode, t, seed):
    spec = attngen.load_spec(SIBLINGS[name], causal=mode == "causal")
    return verify_case(attngen.compile(spec, backend="torch"), spec, dtype=torch.float32, t=t, dk=16, seed=seed)


def _report(res) -> str:
    return ", ".join(f"{n}: {res.errors[n]:.2e} (yardstick {res.ref_errors[n]:.2e})" for n in res.errors)


def test_alibi_causal_t63_seed63():
    """The failing case of `attngen build --all` (dslope 1.46e-5 before, 3.7e-6 now): within the tolerance on its
    own, not only through the yardstick (whose own error at this seed is 1.1e-5)."""
    res = _verify("alibi", "causal", 63, 63)
    assert res.passed, _report(res)
    assert res.errors["dslope"] <= res.tolerance, _report(res)


@pytest.mark.parametrize("mode", MODES)
def test_alibi_seed_sweep_t63(mode):
    failed = {}
    for seed in range(20):
        res = _verify("alibi", mode, 63, seed)
        if not res.passed or res.errors["dslope"] > res.tolerance:
            failed[seed] = _report(res)
    assert not failed, failed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SIBLINGS))
@pytest.mark.parametrize("t", [7, 63, 200, 1000])
def test_siblings_pass_the_rule(name, mode, t):
    """Every sibling passes the rule at T in {7, 63, 200, 1000} (before: alibi causal T = 200 seed 1 failed, and
    alibi at T = 1000 seeds 1 and 5 failed every quantity through a float32 yardstick that overflowed). ALiBi's
    dslope at T = 1000 also meets the tolerance without the yardstick's help (before: up to 2.2e-5)."""
    seeds = (0, 1, 2) if t < 200 else (0, 1) if t == 200 else (1, 5) if name == "alibi" else (1,)
    for seed in seeds:
        res = _verify(name, mode, t, seed)
        assert res.passed, f"seed {seed}: {_report(res)}"
        if name == "alibi":
            assert res.errors["dslope"] <= res.tolerance, f"seed {seed}: {_report(res)}"


def test_row_normalize_rows_cancel_in_float32():
    """The mechanism: O is invariant to scaling row i of A, so sum_j A_ij dA_ij = 0. RowNormalize keeps that to
    one rounding of dA (autograd of (A V) / rowsum(A) left 5..10 ulps of residue, relative to sum_j |A_ij dA_ij|)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 2, 64, 200, generator=g, dtype=torch.float64) * 2 + torch.linspace(0, 3, 200,
                                                                                        dtype=torch.float64)
    a = torch.exp(s - s.amax(-1, keepdim=True)).float().requires_grad_()
    v = torch.randn(2, 2, 200, 16, generator=g).float()
    do = torch.randn(2, 2, 64, 16, generator=g).float()
    quadratic.RowNormalize.apply(a, v, 0.0, False).backward(do)
    terms = a.detach().double() * a.grad.double()
    residue = terms.sum(-1).abs() / terms.abs().sum(-1)
    assert residue.max() <= torch.finfo(torch.float32).eps


@pytest.mark.parametrize("eps,clamp", [(0.0, False), (0.3, False), (2.0, True), ("tensor", True), ("tensor", False)])
def test_row_normalize_gradcheck(eps, clamp):
    """RowNormalize's backward is the derivative of (A V) / g(rowsum A), g(r) = r + eps or max(r, eps) (with a
    clamp of 2.0 some rows hold it: their sum is below eps); eps per row as a tensor, as the scaled eps is."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 2, 5, 7, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0], dtype=torch.float64
                                                                                 ).view(1, 2, 1, 1)
    v = torch.randn(1, 2, 7, 3, generator=g, dtype=torch.float64)
    if eps == "tensor":
        eps = torch.rand(1, 2, 5, 1, generator=g, dtype=torch.float64) * 2
    a.requires_grad_()
    v.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: quadratic.RowNormalize.apply(x, y, eps, clamp), (a, v))


def test_float32_reference_folds_an_exp_reweight():
    """The naive reference in float32 (the yardstick) stays finite where exp(-slope |i - j|) alone overflows."""
    spec = attngen.load_spec("alibi", causal=True)
    q, k, v = (torch.randn(1, 2, 1000, 16, dtype=torch.float64) for _ in range(3))
    slope = torch.tensor([-0.1, 0.05], dtype=torch.float64)  # exp(0.1 * 999) > float32 max
    gold = reference(spec)(q, k, v, slope=slope)
    out = reference(spec)(q.float(), k.float(), v.float(), slope=slope.float())
    assert torch.isfinite(out).all()
    assert attngen.verify.rel_rms(out, gold) < 1e-5

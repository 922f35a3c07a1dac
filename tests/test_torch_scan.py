"""attngen.runtime.torch.scan, the torch backend's causal scan with a hand-derived backward, against the direct
definition in float64 (the T x T weights materialised, autograd through it): outputs, the final state and the
gradients of q', k', v, log(gamma) and the initial state, with and without a decay, strict (j < i) or not,
lengths that leave a short last chunk, several groups of chunks."""
import math

import pytest
import torch

from attngen.runtime.torch import scan

DT = torch.float64


def direct(qf, kf, v, lg, s0, strict):
    """out and final state of the scan by definition: W(i, j) = gamma**(i-j) on j <= i (j < i when strict)."""
    t = qf.shape[2]
    lag = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).to(DT)
    allowed = lag > 0 if strict else lag >= 0
    lgv = torch.zeros(1, qf.shape[1], 1, 1, dtype=DT) if lg is None else lg
    w = torch.where(allowed, torch.exp(lgv * lag.clamp_min(0)), 0.0)
    out = (w * (qf @ kf.transpose(-1, -2))) @ v
    idx = torch.arange(t, dtype=DT).view(1, 1, t, 1)
    final = (torch.exp(lgv * (t - 1 - idx)) * kf).transpose(-1, -2) @ v
    if s0 is not None:
        out = out + torch.exp(lgv * (idx + 1)) * (qf @ s0)
        final = final + torch.exp(lgv * t) * s0
    return out, final


@pytest.mark.parametrize("t,chunk,group", [(37, 8, 16), (64, 16, 32), (5, 8, 1024), (50, 7, 14)])
@pytest.mark.parametrize("decay", [None, 0.87, "per-head"])
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_scan_matches_definition(t, chunk, group, decay, strict, with_state, scale, monkeypatch):
    """``scale`` multiplies the query features inside the scan: the definition sees scale * q'."""
    monkeypatch.setattr(scan, "GROUP_TOKENS", group)
    g = torch.Generator().manual_seed(t + chunk)
    b, h, f, e = 2, 3, 5, 4
    qf, kf = (torch.randn(b, h, t, f, generator=g, dtype=DT) for _ in range(2))
    v = torch.randn(b, h, t, e, generator=g, dtype=DT)
    s0 = torch.randn(b, h, f, e, generator=g, dtype=DT) if with_state else None
    if decay is None:
        lg = None
    elif decay == "per-head":
        lg = torch.log(torch.tensor([0.5, 0.9, 1.0], dtype=DT)).view(1, h, 1, 1)
    else:
        lg = torch.full((1, h, 1, 1), math.log(decay), dtype=DT)
    leaves = [x.clone().requires_grad_() for x in (qf, kf, v)]
    lgl = None if lg is None else lg.clone().requires_grad_()
    s0l = None if s0 is None else s0.clone().requires_grad_()
    out, final = scan.causal_scan(*leaves, chunk, lgl, strict, s0l, scale=scale)
    gold_leaves = [x.clone().requires_grad_() for x in (qf, kf, v)]
    glg = None if lg is None else lg.clone().requires_grad_()
    gs0 = None if s0 is None else s0.clone().requires_grad_()
    gout, gfinal = direct(gold_leaves[0] * scale, *gold_leaves[1:], glg, gs0, strict)
    torch.testing.assert_close(out, gout, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, gfinal, rtol=1e-10, atol=1e-10)
    do, dfin = torch.randn(out.shape, generator=g, dtype=DT), torch.randn(final.shape, generator=g, dtype=DT)
    mine = [x for x in (*leaves, lgl, s0l) if x is not None]
    gold = [x for x in (*gold_leaves, glg, gs0) if x is not None]
    got = torch.autograd.grad((out * do).sum() + (final * dfin).sum(), mine)
    want = torch.autograd.grad((gout * do).sum() + (gfinal * dfin).sum(), gold)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9)


def test_output_gradient_alone_and_no_final_gradient():
    """Only the output used (the final state's gradient is None), and only the final state used."""
    g = torch.Generator().manual_seed(1)
    qf, kf, v = (torch.randn(1, 2, 20, 4, generator=g, dtype=DT, requires_grad=True) for _ in range(3))
    lg = torch.full((1, 2, 1, 1), math.log(0.8), dtype=DT, requires_grad=True)
    for pick in (0, 1):
        mine = scan.causal_scan(qf, kf, v, 8, lg)[pick].sum()
        gold = direct(qf, kf, v, lg, None, False)[pick].sum()
        got = torch.autograd.grad(mine, (qf, kf, v, lg))
        want = torch.autograd.grad(gold, (qf, kf, v, lg), allow_unused=True)  # the final state reads no q
        for a, w, x in zip(got, want, (qf, kf, v, lg)):
            torch.testing.assert_close(a, torch.zeros_like(x) if w is None else w, rtol=1e-9, atol=1e-9)

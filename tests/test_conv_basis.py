"""conv_basis (docs/variants.md, "Conv-Basis"; docs/conv_basis.md): exact on exactly k-conv scores (output, every
gradient, the recovered starts and columns) against the float64 naive reference, both search modes; exact
on any scores with an n-conv basis (p = 1, k = T); the guarantee near k-conv scores; the settings' errors at
the planner and at the call; the plan's cost table on the command line."""
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_close

import attngen
from attngen.approx.conv_basis import execute as torch_conv_basis
from attngen.cli import main
from attngen.errors import InputError, PlanError
from attngen.verify import rel_rms

EXACT = 1e-10  # relative RMS, float64


def softmax_spec(k, search="binary", probe=16, delta=1e-3, similarity="exp(dot(q, k)/sqrt(d))", **extra):
    return {"name": "softmax_cb", "causal": True, "similarity": similarity, "normalize": "rowsum",
            "approx": {"kind": "conv_basis", "k": k, "probe": probe, "delta": delta, "search": search}, **extra}


def kconv_inputs(starts, t, d=8, dv=6, amp=2.0, seed=0, dtype=torch.float64, cancel=None):
    """q, k, v [B, H, T, *] with q_i . k_j / sqrt(d) = sum_{r: s_r <= j} a_r cos(w_r (i - j)): exactly k-conv.

    ``starts[b][h]`` lists the start columns of (b, h) (the first is 0): block r of the head dim holds
    q_i = a_r sqrt(d) [cos(w_r i), sin(w_r i)] and k_j = [j >= s_r] [cos(w_r j), sin(w_r j)], so
    b_r[t] = a_r cos(w_r t). ``cancel`` = (b, h, r, r2): block r2 of (b, h) takes block r's frequency and
    minus its amplitude (from s_r2 on, the scores are those before s_r: a degenerate basis). Returns q, k, v
    and the true columns [B][H] -> list of (a_r, w_r)."""
    g = torch.Generator().manual_seed(seed)
    bsz, heads = len(starts), len(starts[0])
    q = torch.zeros(bsz, heads, t, d, dtype=dtype)
    k = torch.zeros(bsz, heads, t, d, dtype=dtype)
    i = torch.arange(t, dtype=dtype)
    truth = [[[] for _ in range(heads)] for _ in range(bsz)]
    for b in range(bsz):
        for h in range(heads):
            assert 2 * len(starts[b][h]) <= d
            for r, s in enumerate(starts[b][h]):
                w = 0.2 + 1.2 * float(torch.rand((), generator=g, dtype=dtype))
                a = amp * (0.5 + float(torch.rand((), generator=g, dtype=dtype)))
                if cancel is not None and cancel[:2] == (b, h) and r == cancel[3]:
                    a, w = -truth[b][h][cancel[2]][0], truth[b][h][cancel[2]][1]
                truth[b][h].append((a, w))
                on = (i >= s).to(dtype)
                q[b, h, :, 2 * r] = a * math.sqrt(d) * torch.cos(w * i)
                q[b, h, :, 2 * r + 1] = a * math.sqrt(d) * torch.sin(w * i)
                k[b, h, :, 2 * r] = torch.cos(w * i) * on
                k[b, h, :, 2 * r + 1] = torch.sin(w * i) * on
    v = torch.randn(bsz, heads, t, dv, generator=g, dtype=dtype)
    return q, k, v, truth


STARTS = [[[0, 23, 60, 61, 130], [0, 90]], [[0, 7], [0, 40, 41, 42, 100]]]  # per (b, h); T = 160, probe 16


def _grads(op, q, k, v, cot):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = op(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), cot))


@pytest.mark.parametrize("search", ["binary", "scan"])
def test_exact_kconv_output_gradients_and_basis(search):
    t = 160
    q, k, v, truth = kconv_inputs(STARTS, t, d=10)
    op = attngen.compile(softmax_spec(8, search))
    cot = torch.randn(2, 2, t, v.shape[-1], dtype=torch.float64)
    got = _grads(op, q, k, v, cot)
    want = _grads(attngen.reference("softmax"), q, k, v, cot)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        assert_close(name, a, b, EXACT)
    basis = op.last_basis
    assert isinstance(basis, torch_conv_basis.Basis)
    assert basis.k == 5 and basis.starts.shape == (2, 2, 5) and basis.columns.shape == (2, 2, 5, t)
    lags = torch.arange(t, dtype=torch.float64)
    for b in range(2):
        for h in range(2):
            s = STARTS[b][h]
            n = len(s)
            assert int(basis.counts[b, h]) == n
            assert basis.starts[b, h, :n].tolist() == s and (basis.starts[b, h, n:] == t).all()
            assert basis.lengths[b, h, :n].tolist() == [t - x for x in s]
            for r, (a, w) in enumerate(truth[b][h]):  # b_r[t] = a_r cos(w_r t) on t < m_r, zero beyond
                col = basis.columns[b, h, r]
                m = t - s[r]
                assert torch.allclose(col[:m], a * torch.cos(w * lags[:m]), rtol=0, atol=1e-12)
                assert (col[m:] == 0).all()


@pytest.mark.parametrize("search", ["binary", "scan"])
def test_any_scores_have_an_n_conv_basis(search):
    """p = 1, k = T, delta tiny: every column starts an element, so the basis is exact for any q, k."""
    t = 48
    q, k, v = (torch.randn(1, 2, t, 8, dtype=torch.float64) for _ in range(3))
    op = attngen.compile(softmax_spec(t, search, probe=1, delta=1e-9))
    cot = torch.randn(1, 2, t, 8, dtype=torch.float64)
    got = _grads(op, q, k, v, cot)
    want = _grads(attngen.reference("softmax"), q, k, v, cot)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        assert_close(name, a, b, EXACT)
    assert op.last_basis.starts[0, 0].tolist() == list(range(t))


def _basis_matrix(basis, b, h, t):
    """H~ [T, T] that the recovered basis represents: H~[i, j] = u_r[i - j] for s_r <= j < s_{r+1}, i >= j."""
    u = basis.columns[b, h].cumsum(0)  # [K, T]
    starts = basis.starts[b, h]
    j = torch.arange(t)
    seg = (j.unsqueeze(0) >= starts.unsqueeze(1)).sum(0) - 1  # element of each column
    lag = j.unsqueeze(1) - j.unsqueeze(0)  # i - j
    out = u[seg.unsqueeze(0).expand(t, t), lag.clamp_min(0)]
    return torch.where(lag >= 0, out, torch.zeros((), dtype=out.dtype))


def test_guarantee_on_scores_near_k_conv():
    """H = H' + N, H' exactly k-conv, |N| <= eps: the recovered H~ (reading columns of H) is within 2 k eps of H,
    and ||Y~ - Y||_inf <= (exp(2 max|H~ - H|) - 1) ||V||_inf (the bound in docs/variants.md, "Conv-Basis", with
    the recovered matrix)."""
    t, d, starts = 96, 12, [[[0, 17, 50]]]
    q, k, v, _ = kconv_inputs(starts, t, d=d)
    g = torch.Generator().manual_seed(1)
    q[..., 6:] = 0.02 * math.sqrt(d) * torch.randn(1, 1, t, d - 6, generator=g, dtype=torch.float64)
    k[..., 6:] = 0.02 * torch.randn(1, 1, t, d - 6, generator=g, dtype=torch.float64)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    h_full = (q[0, 0] @ k[0, 0].T / math.sqrt(d)).where(mask, torch.zeros(()))
    noise = (q[0, 0, :, 6:] @ k[0, 0, :, 6:].T / math.sqrt(d)).where(mask, torch.zeros(()))
    eps = float(noise.abs().max())
    assert 1e-4 < eps < 0.05
    op = attngen.compile(softmax_spec(6, "scan", delta=0.5))
    out = op(q, k, v)
    assert op.last_basis.starts[0, 0].tolist() == [0, 17, 50]
    err_h = float((_basis_matrix(op.last_basis, 0, 0, t) - h_full).abs().max())
    assert err_h <= 2 * 3 * eps * (1 + 1e-9)
    err_y = float((out - attngen.reference("softmax")(q, k, v)).abs().max())
    assert 0 < err_y <= (math.exp(2 * err_h) - 1) * float(v.abs().max())


def test_float32_inputs_and_random_scores():
    """float32 in, float32 out; on exactly k-conv scores close to the float64 result (float32 scores), and on
    random scores finite with the basis within the declared k."""
    q, k, v, _ = kconv_inputs(STARTS, 160, d=10)
    op = attngen.compile(softmax_spec(8))
    o32 = op(q.float(), k.float(), v.float())
    assert o32.dtype == torch.float32
    assert_close("float32", o32.double(), attngen.reference("softmax")(q, k, v), 1e-5)
    qr, kr, vr = (torch.randn(2, 3, 100, 16) for _ in range(3))
    o = op(qr, kr, vr)
    assert torch.isfinite(o).all() and o.shape == (2, 3, 100, 16)
    assert 1 <= op.last_basis.k <= 8 and (op.last_basis.counts <= 8).all()


def test_binary_search_relies_on_non_degeneracy_scan_does_not():
    """A third element that cancels the second: the heads after it equal those before the second, so the
    predicate is not monotone. The scan still finds every start (exact); the binary search, which tests the
    last candidate column first, finds none after s_1 (inexact: the paper's assumption is violated)."""
    t = 120
    starts = [[[0, 30, 70]]]
    q, k, v, _ = kconv_inputs(starts, t, d=6, cancel=(0, 0, 1, 2))
    ref = attngen.reference("softmax")(q, k, v)
    scan = attngen.compile(softmax_spec(4, "scan"))
    assert_close("scan", scan(q, k, v), ref, EXACT)
    assert scan.last_basis.starts[0, 0].tolist() == [0, 30, 70]
    binary = attngen.compile(softmax_spec(4, "binary"))
    out = binary(q, k, v)
    assert binary.last_basis.starts[0, 0].tolist() == [0]
    assert rel_rms(out, ref) > 1e-3


def test_per_head_scale_parameter_and_its_gradient():
    """score = tau_h * dot(q, k) with a per-head parameter: exact, and the gradient reaches tau."""
    spec = softmax_spec(8, similarity="exp(tau * dot(q, k))", parameters={"tau": {"shape": ["H"], "init": 0.3}})
    q, k, v, _ = kconv_inputs([[[0, 50], [0, 20, 90]]], 128, d=6)
    tau = torch.tensor([0.3, 0.2], dtype=torch.float64, requires_grad=True)
    op, ref = attngen.compile(spec), attngen.reference(spec)
    cot = torch.randn(1, 2, 128, v.shape[-1], dtype=torch.float64)
    o = op(q, k, v, tau=tau)
    (g,) = torch.autograd.grad(o, tau, cot)
    o_ref = ref(q, k, v, tau=tau)
    (g_ref,) = torch.autograd.grad(o_ref, tau, cot)
    assert_close("output", o, o_ref, EXACT)
    assert_close("dtau", g, g_ref, EXACT)
    assert op.last_basis.starts[0, 1].tolist() == [0, 20, 90]


def test_k_is_a_cap():
    """k larger than T is allowed: at most T - p + 1 columns have a full head."""
    q, k, v, _ = kconv_inputs([[[0, 9]]], 24, d=4)
    op = attngen.compile(softmax_spec(100, probe=4))
    assert_close("output", op(q, k, v), attngen.reference("softmax")(q, k, v), EXACT)
    assert op.last_basis.starts[0, 0].tolist() == [0, 9] and op.last_basis.k == 2
    qr, kr, vr = (torch.randn(1, 1, 12, 4, dtype=torch.float64) for _ in range(3))
    op(qr, kr, vr)
    assert op.last_basis.k <= 12 - 4 + 1


def test_probe_longer_than_the_sequence_is_an_input_error():
    op = attngen.compile(softmax_spec(4, probe=16))
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(InputError, match=r"probe = 16 is longer than the sequence \(T = 8\)"):
        op(q, q, q)
    op(torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4))  # probe = T: fine
    assert op.last_basis.k == 1  # only column 0 has a full head


@pytest.mark.parametrize("name", ["cosformer", "alibi", "linear_elu", "retention"])
def test_conv_basis_on_a_non_softmax_spec_is_a_plan_error(name):
    import yaml

    from attngen.frontend.spec import load_spec
    data = {**yaml.safe_load(load_spec(name, causal=True).to_yaml()), "approx": {"kind": "conv_basis", "k": 4}}
    with pytest.raises(PlanError, match="conv_basis approximates causal softmax attention"):
        attngen.compile(data)


def test_score_not_c_dot_qk_is_a_plan_error():
    op = attngen.compile(softmax_spec(4, similarity="exp(dot(relu(q), k))"))
    q = torch.randn(1, 1, 20, 4)
    with pytest.raises(PlanError, match=r"conv_basis needs the score c \* dot\(q, k\)"):
        op(q, q, q)


def test_cli_plan_shows_conv_basis_and_the_exact_alternatives(tmp_path):
    import yaml
    path = tmp_path / "softmax_cb.yaml"
    path.write_text(yaml.safe_dump(softmax_spec(16)))
    result = CliRunner().invoke(main, ["plan", str(path), "--seq-len", "8192"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "approximate: conv_basis with k = 16, probe = 16" in out
    assert "chosen: conv_basis" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["conv_basis"][1] == "yes" and rows["quadratic"][1] == "yes"
    for row in ("conv_basis", "quadratic"):  # both with their GFLOP, MB and cost
        float(rows[row][2]), float(rows[row][3]), float(rows[row][4])

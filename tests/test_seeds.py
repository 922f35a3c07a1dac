"""The built-in cosFormer and Cottention against the math of their papers (docs/variants.md), written out here
in plain torch as the papers state it (not through the spec): value-row scaling for Cottention, the clamp and
M = max(n_q, n_k) for cosFormer. Every backend (torch; triton under the interpreter) is checked."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import attngen

BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cottention_seed(q, k, v, m, causal):
    """Cottention: q_hat = F.normalize(q), v'_j = v_j / max(c_j ** sigmoid(m), 1), O = (q_hat k_hat^T masked) v'."""
    t = q.shape[2]
    qh, kh = F.normalize(q, dim=-1, eps=1e-12), F.normalize(k, dim=-1, eps=1e-12)
    c = torch.arange(1, t + 1, dtype=q.dtype) if causal else torch.full((t,), float(t), dtype=q.dtype)
    scale = (c.view(1, 1, t) ** torch.sigmoid(m).view(1, -1, 1)).clamp_min(1.0)  # [1, H, T]
    vp = v / scale[..., None]
    w = qh @ kh.transpose(-1, -2)
    if causal:
        w = w.tril()
    return w @ vp


def cottention_rnn(q, k, v, m):
    """Cottention's RNN form: S_t = S_{t-1} + k_hat_t v'_t^T, o_t = S_t^T q_hat_t (constant memory)."""
    b, h, t, d = q.shape
    qh, kh = F.normalize(q, dim=-1, eps=1e-12), F.normalize(k, dim=-1, eps=1e-12)
    state = torch.zeros(b, h, d, v.shape[-1], dtype=q.dtype)
    out = []
    for i in range(t):
        vp = v[:, :, i] / ((i + 1) ** torch.sigmoid(m)).clamp_min(1.0).view(1, h, 1)
        state = state + kh[:, :, i, :, None] * vp[:, :, None, :]
        out.append((state * qh[:, :, i, :, None]).sum(-2))
    return torch.stack(out, dim=2)


def cosformer_seed(q, k, v, causal, big_m=None):
    """cosFormer: w_ij = relu(q_i).relu(k_j) cos(pi/2 (i-j)/M), O_i = sum_j w_ij v_j / max(sum_j w_ij, 1e-6)."""
    t, s = q.shape[2], k.shape[2]
    big_m = big_m or max(t, s)
    i = torch.arange(t, dtype=q.dtype).view(t, 1)
    j = torch.arange(s, dtype=q.dtype).view(1, s)
    w = (F.relu(q) @ F.relu(k).transpose(-1, -2)) * torch.cos(math.pi / 2 * (i - j) / big_m)
    if causal:
        w = w.tril()
    return (w @ v) / w.sum(-1, keepdim=True).clamp_min(1e-6)


def _tol(backend):
    return 1e-4 if backend == "triton" else 1e-5


def _rel(a, b):
    return ((a.double().cpu() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-2)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cottention_matches_seed_math(backend, causal):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 70, 32, generator=g, dtype=torch.float64) for _ in range(3))
    m = torch.tensor([0.5, -1.3], dtype=torch.float64)
    want = cottention_seed(q, k, v, m, causal)
    op = attngen.compile(attngen.load_spec("cottention", causal=causal), backend=backend)
    got = op(*(x.float().to(DEVICE) for x in (q, k, v)), m=m.float().to(DEVICE))
    assert _rel(got, want) <= _tol(backend)
    if causal:
        assert _rel(cottention_rnn(q, k, v, m).float(), want) <= 1e-6  # the RNN form is the same operator


def test_cottention_scales_values_not_outputs():
    """Scaling output rows instead of value rows is a different operator: the spec must not be that one."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    m = torch.tensor([0.5, 0.5], dtype=torch.float64)
    ours = attngen.reference("cottention")(q, k, v, m=m)
    qh, kh = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    rows = torch.arange(1, 41, dtype=torch.float64).view(1, 1, 40, 1) ** -torch.sigmoid(m[0])
    output_scaled = ((qh @ kh.transpose(-1, -2)).tril() @ v) * rows
    assert _rel(ours, cottention_seed(q, k, v, m, True)) <= 1e-12
    assert _rel(ours, output_scaled) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,t,s", [(True, 70, 70), (False, 70, 70), (False, 40, 90)],
                         ids=["causal", "bidirectional", "cross-L40-S90"])
def test_cosformer_matches_seed_math(backend, causal, t, s):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, t, 32, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, s, 32, generator=g, dtype=torch.float64) for _ in range(2))
    want = cosformer_seed(q, k, v, causal)  # M = max(L, S)
    op = attngen.compile(attngen.load_spec("cosformer", causal=causal), backend=backend)
    got = op(*(x.float().to(DEVICE) for x in (q, k, v)))
    assert _rel(got, want) <= _tol(backend)
    fixed = attngen.compile(attngen.load_spec("cosformer", causal=causal, M=4096), backend=backend)
    got_fixed = fixed(*(x.float().to(DEVICE) for x in (q, k, v)))
    assert _rel(got_fixed, cosformer_seed(q, k, v, causal, big_m=4096)) <= _tol(backend)


def test_cosformer_clamps_rather_than_adds():
    """A row whose weights sum below 1e-6 is divided by 1e-6 (clamp), not by sum + 1e-6."""
    q = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    q[..., 2, 0] = 4e-4  # row 2: weights 1.6e-7 * cos(...), so the row sum is below the clamp
    k = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    k[..., 0] = 4e-4
    v = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    ours = attngen.reference("cosformer")(q, k, v)
    assert _rel(ours, cosformer_seed(q, k, v, True)) <= 1e-12
    added = attngen.reference(attngen.load_spec("cosformer").to_yaml().replace("clamp", "add"))(q, k, v)
    row_sum = 1.6e-7 * sum(math.cos(math.pi / 2 * (2 - j) / 3) for j in range(3))  # 3.8e-7 < 1e-6
    ratio = added[0, 0, 2] / ours[0, 0, 2]
    assert torch.allclose(ratio, torch.full_like(ratio, 1e-6 / (row_sum + 1e-6)), rtol=1e-6)

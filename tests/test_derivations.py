"""Every identity of docs/derivations.md, checked in float64 against torch.autograd applied to the direct,
materialised definition (the T x T weight matrix, the explicit sum over pairs).

The formulas under test are written out here independently of the references: the chunked scans, the
reverse scans and the hand-derived gradients never call autograd, and the references never call the
scans. Sizes are small and odd on purpose: T = 37 tokens in chunks of C = 8 leaves a last chunk of 5.
Only torch, numpy and pytest are used (no attngen import), so the algebra is checked on its own.
"""
import math

import numpy as np
import pytest
import torch

DT = torch.float64
T, C, F, DV, D = 37, 8, 6, 5, 4  # tokens, chunk, feature width, value width, head dim


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT) * scale


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-10):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def grads(loss: torch.Tensor, *inputs: torch.Tensor):
    return torch.autograd.grad(loss, inputs)


def positive_features(g, n, width):
    """elu(x) + 1 > 0: feature rows whose row sums are positive."""
    return torch.nn.functional.elu(randn(g, n, width)) + 1


def chunks(n: int, c: int):
    """[start, end) of the chunks of c rows covering n rows; the last one may be shorter."""
    return [(s, min(s + c, n)) for s in range(0, n, c)]


def lags(n_q: int, n_k: int) -> torch.Tensor:
    """i - j for query i and key j, [n_q, n_k]."""
    return (torch.arange(n_q)[:, None] - torch.arange(n_k)[None, :]).to(DT)


# --------------------------------------------------------------------------------------------------------
# Section 3 building blocks (also used by sections 2 and 5): the undecayed scans.
# --------------------------------------------------------------------------------------------------------

def bidirectional_backward(qf, kf, v, do):
    """dQ' = dO S^T, G = Q'^T dO, dK' = V G^T, dV = K' G (section 3)."""
    s = kf.T @ v
    g = qf.T @ do
    return do @ s.T, v @ g.T, kf @ g


def causal_forward(qf, kf, v, c, s0=None):
    """O_c = Q'_c S_c + tril(Q'_c K'_c^T) V_c; S_{c+1} = S_c + K'_c^T V_c. Returns (O, S after the end)."""
    s = torch.zeros(qf.shape[1], v.shape[1], dtype=DT) if s0 is None else s0.clone()
    out = []
    for a, b in chunks(qf.shape[0], c):
        q, k, vv = qf[a:b], kf[a:b], v[a:b]
        out.append(q @ s + torch.tril(q @ k.T) @ vv)
        s = s + k.T @ vv
    return torch.cat(out), s


def causal_backward(qf, kf, v, do, c, s0=None, ds_end=None):
    """The reverse scan with G_c = dS_T + sum_{c' >= c} Q'_{c'}^T dO_{c'}. Returns dQ', dK', dV, dS_0."""
    bounds = chunks(qf.shape[0], c)
    s = torch.zeros(qf.shape[1], v.shape[1], dtype=DT) if s0 is None else s0.clone()
    states = []
    for a, b in bounds:  # S_c, the state entering chunk c (a kernel recomputes or stores these)
        states.append(s)
        s = s + kf[a:b].T @ v[a:b]
    g = torch.zeros_like(s) if ds_end is None else ds_end.clone()  # G_{last+1}
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(v)
    for (a, b), s_c in reversed(list(zip(bounds, states))):
        q, k, vv, dd = qf[a:b], kf[a:b], v[a:b], do[a:b]
        da = torch.tril(dd @ vv.T)  # dA(i, j) = dO_i . V_j on the allowed pairs
        dq[a:b] = dd @ s_c.T + da @ k
        dk[a:b] = vv @ g.T + da.T @ q  # g is G_{c+1} here
        dv[a:b] = k @ g + torch.tril(q @ k.T).T @ dd
        g = g + q.T @ dd  # now G_c
    return dq, dk, dv, g


# --------------------------------------------------------------------------------------------------------
# Section 1: position terms are feature concatenation
# --------------------------------------------------------------------------------------------------------

def test_s1_feature_concatenation_equals_sum_of_terms():
    g = gen(1)
    q, k = randn(g, T, D), randn(g, T, D)
    i = torch.arange(T, dtype=DT)[:, None]
    j = torch.arange(T, dtype=DT)[:, None]
    terms = [  # (phi_r, psi_r, f_r(i), g_r(j))
        (torch.relu, torch.relu, torch.ones_like(i), torch.ones_like(j)),
        (lambda x: torch.nn.functional.elu(x) + 1, torch.exp, torch.cos(0.3 * i), (j + 1) ** -0.5),
        (lambda x: x, lambda x: x ** 2, 1 / (1 + i), torch.sin(j) + 2),
    ]
    direct = sum(fi * gj.T * (phi(q) @ psi(k).T) for phi, psi, fi, gj in terms)  # [T, T]
    qf = torch.cat([fi * phi(q) for phi, _, fi, _ in terms], -1)
    kf = torch.cat([gj * psi(k) for _, psi, _, gj in terms], -1)
    assert qf.shape == (T, 3 * D)
    close(qf @ kf.T, direct)


def test_s1_cosformer_is_a_width_2d_feature_map():
    g = gen(2)
    q, k, v = randn(g, T, D), randn(g, T, D), randn(g, T, DV)
    m = T  # cosFormer's M: the longer length
    lag = lags(T, T)
    a = torch.relu(q) @ torch.relu(k).T * torch.cos(math.pi / 2 * lag / m)  # the direct definition
    theta = math.pi / 2 * torch.arange(T, dtype=DT)[:, None] / m
    qf = torch.cat([torch.cos(theta) * torch.relu(q), torch.sin(theta) * torch.relu(q)], -1)
    kf = torch.cat([torch.cos(theta) * torch.relu(k), torch.sin(theta) * torch.relu(k)], -1)
    assert qf.shape == (T, 2 * D)
    close(qf @ kf.T, a)
    # the causal, row-normalised cosFormer output from the features alone (sections 2 and 3 together)
    mask = lag >= 0
    ref = (a * mask) @ v / ((a * mask).sum(-1, keepdim=True) + 1e-6)
    out, _ = causal_forward(qf, kf, torch.cat([v, torch.ones(T, 1, dtype=DT)], -1), C)
    close(out[:, :DV] / (out[:, DV:] + 1e-6), ref)


# --------------------------------------------------------------------------------------------------------
# Section 2: row-sum normalisation is a ones column
# --------------------------------------------------------------------------------------------------------

def _normalised_setup(seed):
    g = gen(seed)
    qf, kf, v, do = positive_features(g, T, F), positive_features(g, T, F), randn(g, T, DV), randn(g, T, DV)
    return qf, kf, v, do


def _eps_for(mode, qf, kf):
    if mode == "add":
        return 1e-3
    den = (qf @ kf.T).sum(-1).sort().values
    return float(den[T // 2 - 1] + den[T // 2]) / 2  # between two row sums: half the rows clamp, none tie


def _den_prime(den, eps, mode):
    return den + eps if mode == "add" else torch.clamp_min(den, eps)


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_s2_ones_column_forward(mode):
    qf, kf, v, _ = _normalised_setup(3)
    eps = _eps_for(mode, qf, kf)
    a = qf @ kf.T
    ref = a @ v / _den_prime(a.sum(-1, keepdim=True), eps, mode)  # direct definition
    aug = qf @ (kf.T @ torch.cat([v, torch.ones(T, 1, dtype=DT)], -1))  # one unnormalised pass on [V | 1]
    num, den = aug[:, :DV], aug[:, DV:]
    close(num / _den_prime(den, eps, mode), ref)


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_s2_ones_column_backward(mode):
    qf, kf, v, do = _normalised_setup(4)
    eps = _eps_for(mode, qf, kf)
    leaves = [x.clone().requires_grad_() for x in (qf, kf, v)]
    a = leaves[0] @ leaves[1].T
    ref_out = a @ leaves[2] / _den_prime(a.sum(-1, keepdim=True), eps, mode)
    ref = grads((ref_out * do).sum(), *leaves)

    v_aug = torch.cat([v, torch.ones(T, 1, dtype=DT)], -1)
    aug = qf @ (kf.T @ v_aug)
    den = aug[:, DV:]
    den_p = _den_prime(den, eps, mode)
    out = aug[:, :DV] / den_p
    d_num = do / den_p
    d_den = -(do * out).sum(-1, keepdim=True) / den_p
    if mode == "clamp":
        assert bool((den <= eps).any()) and bool((den > eps).any())
        d_den = torch.where(den > eps, d_den, torch.zeros_like(d_den))
    dq, dk, dv_aug = bidirectional_backward(qf, kf, v_aug, torch.cat([d_num, d_den], -1))
    for mine, theirs in zip((dq, dk, dv_aug[:, :DV]), ref):  # the ones column's gradient is dropped
        close(mine, theirs)


# --------------------------------------------------------------------------------------------------------
# Section 3: unnormalised linear attention
# --------------------------------------------------------------------------------------------------------

def test_s3_bidirectional_forward_and_backward():
    g = gen(5)
    qf, kf, v, do = randn(g, T, F), randn(g, 29, F), randn(g, 29, DV), randn(g, T, DV)  # 37 queries, 29 keys
    leaves = [x.clone().requires_grad_() for x in (qf, kf, v)]
    ref_out = (leaves[0] @ leaves[1].T) @ leaves[2]  # the T x S matrix, materialised
    ref = grads((ref_out * do).sum(), *leaves)
    close(qf @ (kf.T @ v), ref_out.detach())
    for mine, theirs in zip(bidirectional_backward(qf, kf, v, do), ref):
        close(mine, theirs)


@pytest.mark.parametrize("c", [8, 5, 1, 64])
def test_s3_causal_chunked_forward(c):
    g = gen(6)
    qf, kf, v = randn(g, T, F), randn(g, T, F), randn(g, T, DV)
    ref = torch.tril(qf @ kf.T) @ v
    out, s_end = causal_forward(qf, kf, v, c)
    close(out, ref)
    close(s_end, kf.T @ v)


def _causal_reference(qf, kf, v, do, s0, ds_end):
    leaves = [x.clone().requires_grad_() for x in (qf, kf, v, s0)]
    q, k, vv, s = leaves
    out = torch.tril(q @ k.T) @ vv + q @ s  # S_0 reaches every row
    s_end = s + k.T @ vv
    loss = (out * do).sum() + (s_end * ds_end).sum()
    return out.detach(), s_end.detach(), grads(loss, *leaves)


def test_s3_causal_backward_reverse_scan():
    g = gen(7)
    qf, kf, v, do = randn(g, T, F), randn(g, T, F), randn(g, T, DV), randn(g, T, DV)
    zero = torch.zeros(F, DV, dtype=DT)
    _, _, ref = _causal_reference(qf, kf, v, do, zero, zero)
    dq, dk, dv, _ = causal_backward(qf, kf, v, do, C)
    close(dq, ref[0])
    close(dk, ref[1])
    close(dv, ref[2])


def test_s3_initial_state_and_dS0_equals_G0():
    g = gen(8)
    qf, kf, v, do = randn(g, T, F), randn(g, T, F), randn(g, T, DV), randn(g, T, DV)
    s0, ds_end = randn(g, F, DV), randn(g, F, DV)
    ref_out, ref_end, ref = _causal_reference(qf, kf, v, do, s0, ds_end)
    out, s_end = causal_forward(qf, kf, v, C, s0)
    close(out, ref_out)
    close(s_end, ref_end)
    dq, dk, dv, ds0 = causal_backward(qf, kf, v, do, C, s0, ds_end)
    for mine, theirs in zip((dq, dk, dv, ds0), ref):
        close(mine, theirs)
    close(ds0, ds_end + qf.T @ do)  # G_0 = dS_T + sum over every chunk of Q'_c^T dO_c


# --------------------------------------------------------------------------------------------------------
# Section 4: the decay class, stable
# --------------------------------------------------------------------------------------------------------

def decay_weights(n, lg, two_sided=False):
    """The direct definition: gamma**(i-j) on j <= i (or gamma**|i-j| everywhere), gamma = exp(lg)."""
    lag = lags(n, n)
    w = torch.exp(lg * lag.abs())
    return w if two_sided else w * (lag >= 0)


def decay_forward(qf, kf, v, lg, c, s0=None, strict=False):
    """The chunk-local stable form (every exponent >= 0). ``strict`` excludes the diagonal (j < i).
    Returns (O, the state after the last token)."""
    s = torch.zeros(qf.shape[1], v.shape[1], dtype=DT) if s0 is None else s0.clone()
    out = []
    for a, b in chunks(qf.shape[0], c):
        n = b - a  # C, or fewer for the last chunk
        pos = torch.arange(n, dtype=DT)
        diff = pos[:, None] - pos[None, :]  # a - b inside the chunk
        allowed = diff > 0 if strict else diff >= 0
        w = torch.where(allowed, torch.exp(lg * diff.clamp_min(0)), torch.zeros_like(diff))
        q, k, vv = qf[a:b], kf[a:b], v[a:b]
        out.append(torch.exp(lg * (pos + 1))[:, None] * (q @ s) + (w * (q @ k.T)) @ vv)
        s = torch.exp(lg * n) * s + (torch.exp(lg * (n - 1 - pos))[:, None] * k).T @ vv
    return torch.cat(out), s


def decay_backward(qf, kf, v, do, lg, c, s0=None, ds_end=None, strict=False):
    """The decayed reverse scan, G_c = dL/dS_c = gamma**n G_{c+1} + (gamma**(a+1) Q'_c)^T dO_c.
    Returns dQ', dK', dV, dS_0."""
    bounds = chunks(qf.shape[0], c)
    s = torch.zeros(qf.shape[1], v.shape[1], dtype=DT) if s0 is None else s0.clone()
    states = []
    for a, b in bounds:
        n = b - a
        pos = torch.arange(n, dtype=DT)
        states.append(s)
        s = torch.exp(lg * n) * s + (torch.exp(lg * (n - 1 - pos))[:, None] * kf[a:b]).T @ v[a:b]
    g = torch.zeros_like(s) if ds_end is None else ds_end.clone()
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(v)
    for (a, b), s_c in reversed(list(zip(bounds, states))):
        n = b - a
        pos = torch.arange(n, dtype=DT)
        diff = pos[:, None] - pos[None, :]
        allowed = diff > 0 if strict else diff >= 0
        w = torch.where(allowed, torch.exp(lg * diff.clamp_min(0)), torch.zeros_like(diff))
        read = torch.exp(lg * (pos + 1))[:, None]  # gamma**(a+1): rows reading S_c
        write = torch.exp(lg * (n - 1 - pos))[:, None]  # gamma**(n-1-b): rows writing S_{c+1}
        q, k, vv, dd = qf[a:b], kf[a:b], v[a:b], do[a:b]
        da = w * (dd @ vv.T)
        dq[a:b] = read * (dd @ s_c.T) + da @ k
        dk[a:b] = write * (vv @ g.T) + da.T @ q
        dv[a:b] = write * (k @ g) + (w * (q @ k.T)).T @ dd
        g = torch.exp(lg * n) * g + (read * q).T @ dd
    return dq, dk, dv, g


def decay_dloggamma_scan(qf, kf, v, do, lg, c, s0, ds_end):
    """dL/dlog(gamma) for L = <O, dO> + <S_T, dS_T>, in one forward scan carrying S and the distance-weighted
    state S' = dS/dlog(gamma) (S'_0 = 0: the initial state is an input)."""
    s = s0.clone()
    sd = torch.zeros_like(s0)
    total = torch.zeros((), dtype=DT)
    for a, b in chunks(qf.shape[0], c):
        n = b - a
        pos = torch.arange(n, dtype=DT)
        diff = pos[:, None] - pos[None, :]
        w = torch.where(diff >= 0, torch.exp(lg * diff.clamp_min(0)), torch.zeros_like(diff))
        q, k, vv, dd = qf[a:b], kf[a:b], v[a:b], do[a:b]
        e = diff.clamp_min(0)
        total = total + (e * w * (q @ k.T) * (dd @ vv.T)).sum()  # pairs inside the chunk
        read = torch.exp(lg * (pos + 1))[:, None]
        total = total + (read * (((pos + 1)[:, None] * (q @ s) + q @ sd) * dd)).sum()  # pairs through S_c
        write_e = n - 1 - pos
        weighted = (write_e * torch.exp(lg * write_e))[:, None] * k  # (n-1-b) gamma**(n-1-b) K'_b
        sd = torch.exp(lg * n) * (sd + n * s) + weighted.T @ vv
        s = torch.exp(lg * n) * s + (torch.exp(lg * write_e)[:, None] * k).T @ vv
    return total + (ds_end * sd).sum()


def reverse_rows(*xs):
    return [x.flip(0) for x in xs]


def test_s4_recurrent_state_convention():
    g = gen(9)
    qf, kf, v = randn(g, T, F), randn(g, T, F), randn(g, T, DV)
    gamma = 0.83
    lg = torch.tensor(math.log(gamma), dtype=DT)
    s = torch.zeros(F, DV, dtype=DT)
    out = []
    for t in range(T):  # S_t = gamma S_{t-1} + K'_t^T V_t, o_t = Q'_t S_t
        s = gamma * s + kf[t:t + 1].T @ v[t:t + 1]
        out.append(qf[t:t + 1] @ s)
        direct = sum(gamma ** (t - j) * kf[j:j + 1].T @ v[j:j + 1] for j in range(t + 1))
        close(s, direct)
    close(torch.cat(out), (decay_weights(T, lg) * (qf @ kf.T)) @ v)


@pytest.mark.parametrize("c", [8, 5, 1, 64])
@pytest.mark.parametrize("gamma", [0.9, 0.3, 1.0])
def test_s4_chunk_local_stable_form(c, gamma):
    g = gen(10)
    qf, kf, v, s0 = randn(g, T, F), randn(g, T, F), randn(g, T, DV), randn(g, F, DV)
    lg = torch.tensor(math.log(gamma), dtype=DT)
    i = torch.arange(T, dtype=DT)[:, None]
    # the initial state is the state after token -1: its distance to row i is i + 1
    ref = (decay_weights(T, lg) * (qf @ kf.T)) @ v + torch.exp(lg * (i + 1)) * (qf @ s0)
    ref_end = torch.exp(lg * T) * s0 + (torch.exp(lg * (T - 1 - i)) * kf).T @ v
    out, s_end = decay_forward(qf, kf, v, lg, c, s0)
    close(out, ref)
    close(s_end, ref_end)  # the short last chunk updates with its own length


def test_s4_state_continuation():
    """Stop after p tokens, keep (S, z, pos), continue with positions pos + local index: the same output."""
    g = gen(11)
    q, k, v = positive_features(g, T, F), positive_features(g, T, F), randn(g, T, DV)
    gamma, p = 0.9, 20
    lg = torch.tensor(math.log(gamma), dtype=DT)

    def key_features(x, pos):  # a position-weighted key map: g(j) = (j + 1)**-0.5 at the absolute j
        return x * (pos[:, None] + 1) ** -0.5

    def run(qx, kx, vx, state):
        s, z, pos = state
        idx = pos + torch.arange(qx.shape[0], dtype=DT)
        aug = torch.cat([vx, torch.ones(vx.shape[0], 1, dtype=DT)], -1)
        out, s_end = decay_forward(qx, key_features(kx, idx), aug, lg, C, torch.cat([s, z[:, None]], -1))
        return out[:, :DV] / out[:, DV:], (s_end[:, :DV], s_end[:, DV], pos + qx.shape[0])

    w = decay_weights(T, lg) * (q @ key_features(k, torch.arange(T, dtype=DT)).T)
    ref = w @ v / w.sum(-1, keepdim=True)
    empty = (torch.zeros(F, DV, dtype=DT), torch.zeros(F, dtype=DT), 0)
    first, state = run(q[:p], k[:p], v[:p], empty)
    second, _ = run(q[p:], k[p:], v[p:], state)
    assert state[2] == p
    close(torch.cat([first, second]), ref)


def test_s4_factored_form_overflows_chunk_local_does_not():
    """gamma**i * gamma**(-j) is exact algebra but not arithmetic: gamma**(-j) overflows float64 early."""
    gamma, n = 0.5, 1100
    j = torch.arange(n, dtype=DT)
    assert not torch.isfinite(gamma ** (-j)).all()  # 2**1100 > the largest float64
    lg = torch.tensor(math.log(gamma), dtype=DT)
    pos = torch.arange(C, dtype=DT)
    chunk_local = [torch.exp(lg * (pos + 1)), torch.exp(lg * (C - 1 - pos)), torch.exp(lg * C)]
    assert all(bool(torch.isfinite(x).all() and (x <= 1).all()) for x in chunk_local)


@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_s4_decay_backward_reverse_scan(gamma):
    g = gen(12)
    qf, kf, v, do = randn(g, T, F), randn(g, T, F), randn(g, T, DV), randn(g, T, DV)
    s0, ds_end = randn(g, F, DV), randn(g, F, DV)
    lg = torch.tensor(math.log(gamma), dtype=DT)
    leaves = [x.clone().requires_grad_() for x in (qf, kf, v, s0)]
    q, k, vv, s = leaves
    i = torch.arange(T, dtype=DT)[:, None]
    out = (decay_weights(T, lg) * (q @ k.T)) @ vv + torch.exp(lg * (i + 1)) * (q @ s)
    s_end = torch.exp(lg * T) * s + (torch.exp(lg * (T - 1 - i)) * k).T @ vv
    ref = grads((out * do).sum() + (s_end * ds_end).sum(), *leaves)
    for mine, theirs in zip(decay_backward(qf, kf, v, do, lg, C, s0, ds_end), ref):
        close(mine, theirs)


def test_s4_two_sided_is_causal_plus_anticausal():
    g = gen(13)
    qf, kf, v, do = randn(g, T, F), randn(g, T, F), randn(g, T, DV), randn(g, T, DV)
    lg = torch.tensor(math.log(0.85), dtype=DT)
    leaves = [x.clone().requires_grad_() for x in (qf, kf, v)]
    ref_out = (decay_weights(T, lg, two_sided=True) * (leaves[0] @ leaves[1].T)) @ leaves[2]
    ref = grads((ref_out * do).sum(), *leaves)
    causal, _ = decay_forward(qf, kf, v, lg, C)
    anti, _ = decay_forward(*reverse_rows(qf, kf, v), lg, C, strict=True)  # j > i: a reverse scan
    close(causal + anti.flip(0), ref_out.detach())
    # gradients: each scan's own backward, the anti-causal one on the reversed rows without the diagonal
    d_causal = decay_backward(qf, kf, v, do, lg, C)[:3]
    d_anti = [x.flip(0) for x in decay_backward(*reverse_rows(qf, kf, v, do), lg, C, strict=True)[:3]]
    for a, b, theirs in zip(d_causal, d_anti, ref):
        close(a + b, theirs)
    # dL/dlog(gamma): the sum of the two scans' terms (a diagonal pair has distance 0 and adds nothing)
    lg_leaf = lg.clone().requires_grad_()
    out = (decay_weights(T, lg_leaf, two_sided=True) * (qf @ kf.T)) @ v
    (ref_lg,) = grads((out * do).sum(), lg_leaf)
    zero = torch.zeros(F, DV, dtype=DT)
    mine = (decay_dloggamma_scan(qf, kf, v, do, lg, C, zero, zero)
            + decay_dloggamma_scan(*reverse_rows(qf, kf, v, do), lg, C, zero, zero))
    close(mine, ref_lg)


@pytest.mark.parametrize("two_sided", [False, True])
def test_s4_dloggamma_pair_sum(two_sided):
    """dL/dlog(gamma) = sum over allowed pairs of e(i, j) A(i, j) dA(i, j), e = i - j or |i - j|; and a
    learnable gamma = sigmoid(x) chains through dlog(gamma)/dx = 1 - sigmoid(x)."""
    g = gen(14)
    qf, kf, v, do = randn(g, T, F), randn(g, T, F), randn(g, T, DV), randn(g, T, DV)
    x = torch.tensor(1.7, dtype=DT, requires_grad=True)
    lg = torch.log(torch.sigmoid(x))
    lg_leaf = lg.detach().requires_grad_()
    w = decay_weights(T, lg_leaf, two_sided)
    ((w * (qf @ kf.T)) @ v * do).sum().backward()
    with torch.no_grad():
        a = decay_weights(T, lg.detach(), two_sided) * (qf @ kf.T)  # A(i, j), decay included
        da = do @ v.T
        mine = (lags(T, T).abs() * a * da).sum()  # e = |i - j| = i - j on the causal pairs
    close(mine, lg_leaf.grad)
    loss = ((decay_weights(T, lg, two_sided) * (qf @ kf.T)) @ v * do).sum()
    (dx,) = grads(loss, x)
    close(mine * (1 - torch.sigmoid(x.detach())), dx)


def test_s4_dloggamma_in_the_scan():
    """The same gradient from the chunk-local scan with the distance-weighted state S', including the
    initial state and a gradient reaching the final state."""
    g = gen(15)
    qf, kf, v, do = randn(g, T, F), randn(g, T, F), randn(g, T, DV), randn(g, T, DV)
    s0, ds_end = randn(g, F, DV), randn(g, F, DV)
    lg = torch.tensor(math.log(0.9), dtype=DT, requires_grad=True)
    i = torch.arange(T, dtype=DT)[:, None]
    out = (decay_weights(T, lg) * (qf @ kf.T)) @ v + torch.exp(lg * (i + 1)) * (qf @ s0)
    s_end = torch.exp(lg * T) * s0 + (torch.exp(lg * (T - 1 - i)) * kf).T @ v
    (ref,) = grads((out * do).sum() + (s_end * ds_end).sum(), lg)
    mine = decay_dloggamma_scan(qf, kf, v, do, lg.detach(), C, s0, ds_end)
    close(mine, ref)


# --------------------------------------------------------------------------------------------------------
# Section 5: through the feature maps and position weights
# --------------------------------------------------------------------------------------------------------

def test_s5_elementwise_map_derivative():
    """dq = sum_r f_r(i) phi_r'(q) dQ'_r, each phi_r' written out by hand."""
    g = gen(16)
    q, gq = randn(g, T, D), randn(g, T, 3 * D)  # gq: the gradient reaching Q' (three blocks of width d)
    i = torch.arange(T, dtype=DT)[:, None]
    maps = [  # (phi_r, phi_r', f_r(i))
        (lambda x: torch.nn.functional.elu(x) + 1, lambda x: torch.where(x > 0, 1.0, torch.exp(x)),
         torch.ones_like(i)),
        (lambda x: x ** 2, lambda x: 2 * x, torch.cos(math.pi / 2 * i / T)),
        (torch.exp, torch.exp, torch.sin(math.pi / 2 * i / T)),
    ]
    leaf = q.clone().requires_grad_()
    qf = torch.cat([f * phi(leaf) for phi, _, f in maps], -1)
    (ref,) = grads((qf * gq).sum(), leaf)
    mine = sum(f * dphi(q) * gq[:, r * D:(r + 1) * D] for r, (_, dphi, f) in enumerate(maps))
    close(mine, ref)


@pytest.mark.parametrize("regime", ["norm_above_eps", "norm_below_eps"])
def test_s5_cosine_row_map_gradient(regime):
    g = gen(17)
    eps = 1e-3
    x, gx = randn(g, T, D), randn(g, T, D)
    if regime == "norm_below_eps":
        x = x * 1e-5  # |x| ~ 2e-5 < eps
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    assert bool((norm > eps).all()) if regime == "norm_above_eps" else bool((norm <= eps).all())
    leaf = x.clone().requires_grad_()
    x_hat = leaf / torch.clamp_min(torch.linalg.vector_norm(leaf, dim=-1, keepdim=True), eps)
    (ref,) = grads((x_hat * gx).sum(), leaf)
    x_hat = x / norm
    above = (gx - x_hat * (x_hat * gx).sum(-1, keepdim=True)) / norm
    mine = torch.where(norm > eps, above, gx / eps)
    close(mine, ref)


def test_s5_tensor_power_gradient():
    """x (x) x (width d**2): dx_a = sum_b (G_ab + G_ba) x_b."""
    g = gen(18)
    x, gg = randn(g, T, D), randn(g, T, D, D)
    leaf = x.clone().requires_grad_()
    y = (leaf[:, :, None] * leaf[:, None, :]).flatten(1)  # [T, d*d], index a*d + b
    (ref,) = grads((y * gg.flatten(1)).sum(), leaf)
    mine = torch.einsum("tab,tb->ta", gg + gg.transpose(1, 2), x)
    close(mine, ref)


def test_s5_tensor_product_of_two_maps_gradient():
    """e(x) (x) h(x): dx = e'(x) o (G h) + h'(x) o (G^T e)."""
    g = gen(19)
    x, gg = randn(g, T, D), randn(g, T, D, D)
    leaf = x.clone().requires_grad_()
    y = (torch.exp(leaf)[:, :, None] * torch.sin(leaf)[:, None, :]).flatten(1)
    (ref,) = grads((y * gg.flatten(1)).sum(), leaf)
    e, de, h, dh = torch.exp(x), torch.exp(x), torch.sin(x), torch.cos(x)
    mine = de * torch.einsum("tab,tb->ta", gg, h) + dh * torch.einsum("tab,ta->tb", gg, e)
    close(mine, ref)


def test_s5_cottention_key_weight_gradient():
    """Cottention's g(j; m) = (j+1)**(-sigmoid(m)) on the key side: dm = sum_j (dK'_j . psi(k_j)) dg/dm, with
    dK' from the section 3 reverse scan; a query-side weight f(i; p) = exp(-p i / T) alike."""
    g = gen(20)
    q, k, v, do = randn(g, T, D), randn(g, T, D), randn(g, T, DV), randn(g, T, DV)
    eps = 1e-12
    m0, p0 = 0.5, 0.8
    j = torch.arange(T, dtype=DT)[:, None]

    def row_map(x):
        return x / torch.clamp_min(torch.linalg.vector_norm(x, dim=-1, keepdim=True), eps)

    m = torch.tensor(m0, dtype=DT, requires_grad=True)
    p = torch.tensor(p0, dtype=DT, requires_grad=True)
    gj = (j + 1) ** (-torch.sigmoid(m))
    fi = torch.exp(-p * j / T)
    a = torch.tril((fi * row_map(q)) @ (gj * row_map(k)).T)  # the direct, materialised definition
    ref_dm, ref_dp = grads(((a @ v) * do).sum(), m, p)

    sig = 1 / (1 + math.exp(-m0))
    gj = (j + 1) ** (-sig)
    fi = torch.exp(-p0 * j / T)
    phi, psi = row_map(q), row_map(k)
    dqf, dkf, _, _ = causal_backward(fi * phi, gj * psi, v, do, C)
    gk = (dkf * psi).sum(-1, keepdim=True)  # G_j: the gradient reaching g(j)
    dm = (gk * -torch.log(j + 1) * sig * (1 - sig) * gj).sum()
    gq = (dqf * phi).sum(-1, keepdim=True)  # the gradient reaching f(i)
    dp = (gq * (-j / T) * fi).sum()
    close(dm, ref_dm)
    close(dp, ref_dp)


# --------------------------------------------------------------------------------------------------------
# Section 6: the softmax family
# --------------------------------------------------------------------------------------------------------

SCALE = 1 / math.sqrt(D)


def _scores(q, k, slope):
    """s = scale q.k - slope |i - j| (ALiBi) on j <= i, -inf elsewhere."""
    lag = lags(q.shape[0], k.shape[0])
    s = SCALE * q @ k.T - slope * lag.abs()
    return s.masked_fill(lag < 0, float("-inf"))


def online_softmax(s, v, block, eps=0.0):
    """Running max m and sum l over key blocks; O = acc / (l + eps exp(-m)), LSE = m + log l."""
    n = s.shape[0]
    m = torch.full((n, 1), float("-inf"), dtype=DT)
    l_sum = torch.zeros(n, 1, dtype=DT)
    acc = torch.zeros(n, v.shape[1], dtype=DT)
    for a, b in chunks(s.shape[1], block):
        sb = s[:, a:b]
        m_new = torch.maximum(m, sb.max(-1, keepdim=True).values)
        alpha = torch.exp(m - m_new)  # rescale what was summed under the old max
        pb = torch.exp(sb - m_new)
        l_sum = alpha * l_sum + pb.sum(-1, keepdim=True)
        acc = alpha * acc + pb @ v[a:b]
        m = m_new
    return acc / (l_sum + eps * torch.exp(-m)), m + torch.log(l_sum)


@pytest.mark.parametrize("block", [8, 5, 64])
def test_s6_online_softmax_in_blocks(block):
    g = gen(21)
    q, k, v = randn(g, T, D, scale=3.0), randn(g, T, D, scale=3.0), randn(g, T, DV)
    s = _scores(q, k, 0.1)
    out, lse = online_softmax(s, v, block)
    close(out, torch.softmax(s, -1) @ v)
    close(lse[:, 0], torch.logsumexp(s, -1))
    # a row sum with eps added: in units of exp(m) the eps is eps * exp(-m)
    eps = 0.5
    out_eps, _ = online_softmax(s, v, block, eps)
    e = torch.exp(s)
    close(out_eps, e @ v / (e.sum(-1, keepdim=True) + eps))


def _softmax_backward(q, k, v, do, s, out, lse):
    """P from the saved LSE; D_i = dO_i . O_i; dP = dO V^T; ds = P (dP - D)."""
    p = torch.exp(s - lse)
    d = (do * out).sum(-1, keepdim=True)
    ds = p * (do @ v.T - d)
    return p, ds


def test_s6_backward_ds_and_dq_dk_dv():
    g = gen(22)
    q, k, v, do = randn(g, T, D), randn(g, T, D), randn(g, T, DV), randn(g, T, DV)
    slope = 0.07
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out = torch.softmax(_scores(leaves[0], leaves[1], slope), -1) @ leaves[2]
    ref = grads((ref_out * do).sum(), *leaves)
    s = _scores(q, k, slope)
    out, lse = online_softmax(s, v, C)
    p, ds = _softmax_backward(q, k, v, do, s, out, lse)
    dr = ds  # ALiBi: dmod/dr = 1
    close(SCALE * dr @ k, ref[0])
    close(SCALE * dr.T @ q, ref[1])
    close(p.T @ do, ref[2])


def test_s6_alibi_slope_gradient():
    g = gen(23)
    q, k, v, do = randn(g, T, D), randn(g, T, D), randn(g, T, DV), randn(g, T, DV)
    slope = torch.tensor(0.07, dtype=DT, requires_grad=True)
    (ref,) = grads(((torch.softmax(_scores(q, k, slope), -1) @ v) * do).sum(), slope)
    s = _scores(q, k, slope.detach())
    out, lse = online_softmax(s, v, C)
    _, ds = _softmax_backward(q, k, v, do, s, out, lse)
    close(-(ds * lags(T, T).abs()).sum(), ref)


def test_s6_softcap_modification_gradient():
    """A modification with dmod/dr != 1: s = c tanh(r / c), r = scale q.k; dr = ds (1 - tanh**2) and
    dc = sum ds (tanh(r/c) - (r/c)(1 - tanh**2(r/c)))."""
    g = gen(24)
    q, k, v, do = randn(g, T, D, scale=2.0), randn(g, T, D, scale=2.0), randn(g, T, DV), randn(g, T, DV)
    cap0 = 1.5
    mask = lags(T, T) < 0
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    cap = torch.tensor(cap0, dtype=DT, requires_grad=True)
    s_ref = (cap * torch.tanh(SCALE * leaves[0] @ leaves[1].T / cap)).masked_fill(mask, float("-inf"))
    ref = grads(((torch.softmax(s_ref, -1) @ leaves[2]) * do).sum(), *leaves, cap)
    r = SCALE * q @ k.T
    th = torch.tanh(r / cap0)
    s = (cap0 * th).masked_fill(mask, float("-inf"))
    out, lse = online_softmax(s, v, C)
    p, ds = _softmax_backward(q, k, v, do, s, out, lse)
    dr = ds * (1 - th ** 2)
    close(SCALE * dr @ k, ref[0])
    close(SCALE * dr.T @ q, ref[1])
    close(p.T @ do, ref[2])
    close((ds * (th - r / cap0 * (1 - th ** 2))).sum(), ref[3])


def test_s6_lse_gradient_and_shared_normaliser():
    """A gradient on LSE enters the backward as D_i - dLSE_i; and two softmax terms plus a linear one under one row
    sum, combined from (O_t, LSE_t) and (N_t, Z_t) with the shift M = max(LSE_t, 0, log eps), equal the direct sum
    over pairs, at scores (scaled 40x) whose exp passes float32's range."""
    g = gen(26)
    q, k, v, do, dl = randn(g, T, D), randn(g, T, D), randn(g, T, DV), randn(g, T, DV), randn(g, T)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    s_ref = _scores(leaves[0], leaves[1], 0.07)
    ref = grads(((torch.softmax(s_ref, -1) @ leaves[2]) * do).sum() + (torch.logsumexp(s_ref, -1) * dl).sum(),
                *leaves)
    s = _scores(q, k, 0.07)
    out, lse = online_softmax(s, v, C)
    p = torch.exp(s - lse)
    ds = p * (do @ v.T - ((do * out).sum(-1, keepdim=True) - dl[:, None]))
    close(SCALE * ds @ k, ref[0])
    close(SCALE * ds.T @ q, ref[1])
    close(p.T @ do, ref[2])

    q2, k2 = randn(g, T, D, scale=40.0), randn(g, T, D)
    s1, s2 = _scores(q, k, 0.0) * 40, _scores(q2, k2, 0.3)
    assert s1.max() > math.log(torch.finfo(torch.float32).max)
    feats_q, feats_k = positive_features(g, T, F), positive_features(g, T, F)
    a3 = (feats_q @ feats_k.T) * (lags(T, T) >= 0)
    c1, c2, c3, eps = 0.7, 1.3, 0.4, 1e-6
    direct = c1 * torch.exp(s1) + c2 * torch.exp(s2) + c3 * a3
    want = direct @ v / (direct.sum(-1, keepdim=True) + eps)
    (o1, l1), (o2, l2) = online_softmax(s1, v, C), online_softmax(s2, v, C)
    n3, z3 = a3 @ v, a3.sum(-1, keepdim=True)
    m = torch.maximum(torch.maximum(l1, l2), torch.tensor(max(0.0, math.log(eps)), dtype=DT))
    w1, w2 = c1 * torch.exp(l1 - m), c2 * torch.exp(l2 - m)
    num = w1 * o1 + w2 * o2 + c3 * n3 * torch.exp(-m)
    den = w1 + w2 + c3 * z3 * torch.exp(-m) + eps * torch.exp(-m)
    close(num / den, want)


def test_s6_D_identity_and_fp16_output_shift():
    """D_i = sum_j P_ij dP_ij = dO_i . O_i, so every row of ds sums to 0. With O rounded to fp16 each
    ds_ij of row i moves by -P_ij (D~_i - D_i): the reason for keeping an fp32 copy of O."""
    g = gen(25)
    q, k, v, do = randn(g, T, D), randn(g, T, D), randn(g, T, DV), randn(g, T, DV)
    s = _scores(q, k, 0.0)
    out, lse = online_softmax(s, v, C)
    p, ds = _softmax_backward(q, k, v, do, s, out, lse)
    close((p * (do @ v.T)).sum(-1), (do * out).sum(-1))
    close(ds.sum(-1), torch.zeros(T, dtype=DT))
    rounded = out.to(torch.float16).to(DT)
    _, ds_rounded = _softmax_backward(q, k, v, do, s, rounded, lse)
    shift = (do * rounded).sum(-1, keepdim=True) - (do * out).sum(-1, keepdim=True)
    close(ds_rounded - ds, -p * shift)
    assert shift.abs().max() > 1e-6  # not a no-op: fp16 rounding moves D well past float64 noise


# --------------------------------------------------------------------------------------------------------
# Section 7: Toeplitz weights by FFT
# --------------------------------------------------------------------------------------------------------

def kernel_h(x: torch.Tensor) -> torch.Tensor:
    """A two-sided h with no finite separation, different on each side."""
    return torch.where(x >= 0, (1 + x) ** -0.75, 0.5 * (1 + x.abs()) ** -0.5)


def causal_part(h):
    """h on x >= 0 only."""
    return lambda x: torch.where(x >= 0, h(x.clamp_min(0)), torch.zeros_like(x))


def toeplitz_conv(u, h, n_out):
    """y_i = sum_j h(i - j) u_j for i < n_out, j < len(u): a circular convolution of length n >= n_out +
    len(u) - 1 along the first axis, lag x stored at slot x mod n (so no two lags share a slot)."""
    n_in = u.shape[0]
    n = 1 << (n_out + n_in - 2).bit_length()
    lag = torch.arange(-(n_in - 1), n_out, dtype=DT)
    h_circ = torch.zeros(n, dtype=DT)
    h_circ[lag.long() % n] = h(lag)
    h_hat = torch.fft.rfft(h_circ, n=n).reshape(-1, *([1] * (u.dim() - 1)))
    return torch.fft.irfft(torch.fft.rfft(u, n=n, dim=0) * h_hat, n=n, dim=0)[:n_out]


def toeplitz_fft(qf, kf, v, h):
    """O_i = Q'_i . sum_j h(i - j) U_j with U_j = K'_j^T V_j [S, F, E] (T * F * E memory per head)."""
    conv = toeplitz_conv(kf[:, :, None] * v[:, None, :], h, qf.shape[0])  # [T, F, E]
    return torch.einsum("tf,tfe->te", qf, conv), conv


def test_s7_fft_causal_equals_toeplitz_sum():
    g = gen(26)
    qf, kf, v = positive_features(g, T, F), positive_features(g, T, F), randn(g, T, DV)
    lag = lags(T, T)
    w = torch.where(lag >= 0, kernel_h(lag.clamp_min(0)), torch.zeros_like(lag))
    a = w * (qf @ kf.T)
    close(toeplitz_fft(qf, kf, v, causal_part(kernel_h))[0], a @ v)
    # normalised by the ones column again
    aug, _ = toeplitz_fft(qf, kf, torch.cat([v, torch.ones(T, 1, dtype=DT)], -1), causal_part(kernel_h))
    close(aug[:, :DV] / aug[:, DV:], a @ v / a.sum(-1, keepdim=True))


@pytest.mark.parametrize("n_keys", [T, 29, 50])
def test_s7_fft_bidirectional_equals_toeplitz_sum(n_keys):
    g = gen(27)
    qf, kf, v = randn(g, T, F), randn(g, n_keys, F), randn(g, n_keys, DV)
    w = kernel_h(lags(T, n_keys))  # two-sided: lags -(S-1) .. T-1
    close(toeplitz_fft(qf, kf, v, kernel_h)[0], (w * (qf @ kf.T)) @ v)


@pytest.mark.parametrize("causal", [False, True])
def test_s7_fft_backward_is_the_reflected_convolution(causal):
    """dQ'_i = dO_i (sum_j h(i-j) U_j)^T; dU_j = sum_i h(i-j) Q'_i^T dO_i is the same FFT convolution with
    the reflected kernel h~(y) = h(-y) run from the queries to the keys; dK'_j = V_j dU_j^T and
    dV_j = K'_j dU_j."""
    g = gen(28)
    s_len = 29
    h = causal_part(kernel_h) if causal else kernel_h
    qf, kf, v, do = randn(g, T, F), randn(g, s_len, F), randn(g, s_len, DV), randn(g, T, DV)
    leaves = [x.clone().requires_grad_() for x in (qf, kf, v)]
    ref_out = (h(lags(T, s_len)) * (leaves[0] @ leaves[1].T)) @ leaves[2]
    ref = grads((ref_out * do).sum(), *leaves)
    _, conv = toeplitz_fft(qf, kf, v, h)
    du = toeplitz_conv(qf[:, :, None] * do[:, None, :], lambda y: h(-y), s_len)  # [S, F, E]
    close(torch.einsum("te,tfe->tf", do, conv), ref[0])
    close(torch.einsum("sfe,se->sf", du, v), ref[1])
    close(torch.einsum("sf,sfe->se", kf, du), ref[2])


def test_s7_numpy_and_torch_fft_agree_on_the_circular_layout():
    """The layout lag x -> slot x mod n, checked once with numpy's FFT on a scalar sequence."""
    rng = np.random.default_rng(29)
    t = 11
    u = rng.standard_normal(t)
    n = 1 << (2 * t - 2).bit_length()
    x = np.arange(-(t - 1), t)
    h_circ = np.zeros(n)
    h_circ[x % n] = kernel_h(torch.tensor(x, dtype=DT)).numpy()
    conv = np.fft.irfft(np.fft.rfft(u, n) * np.fft.rfft(h_circ, n), n)[:t]
    direct = kernel_h(lags(t, t)).numpy() @ u
    np.testing.assert_allclose(conv, direct, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------
# Section 8: the causal scan in parallel over chunks
# --------------------------------------------------------------------------------------------------------

def test_s8_chunk_parallel_forward_and_backward():
    g = gen(80)
    qf, kf, v, do = randn(g, T, F), randn(g, T, F), randn(g, T, DV), randn(g, T, DV)
    s0, ds_end = randn(g, F, DV), randn(g, F, DV)
    ref_out, ref_end, ref = _causal_reference(qf, kf, v, do, s0, ds_end)
    spans = chunks(T, C)
    hs, s = [], s0.clone()
    for a, b in spans:  # the sequential pass: the state before every chunk
        hs.append(s.clone())
        s = s + kf[a:b].T @ v[a:b]
    gs, gr = [None] * len(spans), ds_end.clone()
    for n in reversed(range(len(spans))):  # the reverse pass: the state gradient after every chunk
        a, b = spans[n]
        gs[n] = gr.clone()
        gr = gr + qf[a:b].T @ do[a:b]
    out, dq, dk, dv = (torch.zeros_like(x) for x in (v, qf, kf, v))
    for n, (a, b) in enumerate(spans):  # every chunk alone, from H_c and G_c
        qc, kc, vc, dc = qf[a:b], kf[a:b], v[a:b], do[a:b]
        out[a:b] = qc @ hs[n] + torch.tril(qc @ kc.T) @ vc
        da = torch.tril(dc @ vc.T)
        dq[a:b] = dc @ hs[n].T + da @ kc
        dk[a:b] = vc @ gs[n].T + da.T @ qc
        dv[a:b] = kc @ gs[n] + torch.tril(qc @ kc.T).T @ dc
    close(out, ref_out)
    close(s, ref_end)
    for mine, theirs in zip((dq, dk, dv, gr), ref):  # dS_0: the reverse pass past the first chunk
        close(mine, theirs)


def test_s8_decay_chunk_parallel_and_dloggamma_identity():
    """The decay class in parallel over chunks: H_c, G_c (anchored at the chunk's last row) from the two
    sequential passes, every chunk alone from them, and dL/dlog(gamma) from the identity
    sum_i i Q'_i.dQ'_i - sum_j j K'_j.dK'_j + <dS_0, S_0> + (T - 1) <dS_T, S_T>, against autograd on the direct
    definition (T = 37 in chunks of 8, an initial state and a final state gradient)."""
    g = gen(81)
    qf, kf, v, do = randn(g, T, F), randn(g, T, F), randn(g, T, DV), randn(g, T, DV)
    s0, ds_end = randn(g, F, DV), randn(g, F, DV)
    lg = torch.tensor(math.log(0.87), dtype=DT, requires_grad=True)
    leaves = [x.clone().requires_grad_() for x in (qf, kf, v, s0)]
    lq, lk, lv, ls0 = leaves
    idx = torch.arange(T, dtype=DT)
    o_ref = (decay_weights(T, lg) * (lq @ lk.T)) @ lv + torch.exp(lg * (idx + 1))[:, None] * (lq @ ls0)
    s_ref = (torch.exp(lg * (T - 1 - idx))[:, None] * lk).T @ lv + torch.exp(lg * T) * ls0
    ref = grads((o_ref * do).sum() + (s_ref * ds_end).sum(), lg, *leaves)
    lg = lg.detach()
    spans = chunks(T, C)
    hs, s = [], s0.clone()
    for a, b in spans:  # H_(c+1) = gamma**n H_c + (gamma**(n-1-l) K'_c)^T V_c
        n, pos = b - a, torch.arange(b - a, dtype=DT)
        hs.append(s.clone())
        s = torch.exp(lg * n) * s + (torch.exp(lg * (n - 1 - pos))[:, None] * kf[a:b]).T @ v[a:b]
    gs, gr = [None] * len(spans), ds_end.clone()
    for c in reversed(range(len(spans))):  # G_(c-1) = gamma**n G_c + (gamma**(l+1) Q'_c)^T dO_c
        a, b = spans[c]
        pos = torch.arange(b - a, dtype=DT)
        gs[c] = gr.clone()
        gr = torch.exp(lg * (b - a)) * gr + (torch.exp(lg * (pos + 1))[:, None] * qf[a:b]).T @ do[a:b]
    out, dq, dk, dv = (torch.zeros_like(x) for x in (v, qf, kf, v))
    for c, (a, b) in enumerate(spans):  # every chunk alone
        n, pos = b - a, torch.arange(b - a, dtype=DT)
        w = torch.where(pos[:, None] >= pos[None, :], torch.exp(lg * (pos[:, None] - pos[None, :]).clamp_min(0)), 0.0)
        read, write = torch.exp(lg * (pos + 1))[:, None], torch.exp(lg * (n - 1 - pos))[:, None]
        qc, kc, vc, dc = qf[a:b], kf[a:b], v[a:b], do[a:b]
        out[a:b] = read * (qc @ hs[c]) + (w * (qc @ kc.T)) @ vc
        da = w * (dc @ vc.T)
        dq[a:b] = read * (dc @ hs[c].T) + da @ kc
        dk[a:b] = write * (vc @ gs[c].T) + da.T @ qc
        dv[a:b] = write * (kc @ gs[c]) + (w * (qc @ kc.T)).T @ dc
    dlg = (idx * (qf * dq).sum(1)).sum() - (idx * (kf * dk).sum(1)).sum() + (gr * s0).sum() \
        + (T - 1) * (ds_end * s).sum()
    close(out, o_ref.detach())
    close(s, s_ref.detach())
    for mine, theirs in zip((dlg, dq, dk, dv, gr), ref):  # dS_0 = G_(-1): the reverse pass past chunk 0
        close(mine, theirs)


# --------------------------------------------------------------------------------------------------------
# Section 9: gates, a data-dependent decay per token
# --------------------------------------------------------------------------------------------------------

def _gated_direct(qf, kf, v, g, s0, per_dim: bool):
    """O and S_T from the materialised weights exp(G_i - G_j) (per dimension: inside the dot product)."""
    big = g.cumsum(0)  # [T] or [T, F]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if per_dim:
        diff = (big[:, None, :] - big[None, :, :]).masked_fill(~mask[..., None], float("-inf"))
        a = (qf[:, None, :] * kf[None, :, :] * torch.exp(diff)).sum(-1)
        out = a @ v + (qf * torch.exp(big)) @ s0
        end = (kf * torch.exp(big[-1] - big)).T @ v + torch.exp(big[-1])[:, None] * s0
    else:
        diff = (big[:, None] - big[None, :]).masked_fill(~mask, float("-inf"))
        out = (torch.exp(diff) * (qf @ kf.T)) @ v + torch.exp(big)[:, None] * (qf @ s0)
        end = (torch.exp(big[-1] - big)[:, None] * kf).T @ v + torch.exp(big[-1]) * s0
    return out, end


@pytest.mark.parametrize("per_dim", [False, True], ids=["per-head", "per-dim"])
def test_s9_gated_chunks_and_gate_gradient(per_dim):
    g = gen(90 + per_dim)
    qf, kf, v, do = randn(g, T, F), randn(g, T, F), randn(g, T, DV), randn(g, T, DV)
    s0, ds_end = randn(g, F, DV), randn(g, F, DV)
    gate = torch.nn.functional.logsigmoid(1.0 + randn(g, *((T, F) if per_dim else (T,))))
    leaves = [x.clone().requires_grad_() for x in (qf, kf, v, s0, gate)]
    o_ref, s_ref = _gated_direct(*leaves[:3], leaves[4], leaves[3], per_dim)
    ref = grads((o_ref * do).sum() + (s_ref * ds_end).sum(), *leaves)
    # the chunk-local form: every exponent <= 0
    out, s = torch.zeros_like(v), s0.clone()
    for a, b in chunks(T, C):
        cum = gate[a:b].cumsum(0)
        last = cum[-1]
        assert bool((cum <= 0).all())
        wq, wk = torch.exp(cum), torch.exp(last - cum)
        mask = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        if per_dim:
            w = torch.exp((cum[:, None, :] - cum[None, :, :]).masked_fill(~mask[..., None], float("-inf")))
            pairs = (qf[a:b, None, :] * kf[None, a:b, :] * w).sum(-1)
            out[a:b] = (wq * qf[a:b]) @ s + pairs @ v[a:b]
            s = torch.exp(last)[:, None] * s + (wk * kf[a:b]).T @ v[a:b]
        else:
            w = torch.exp((cum[:, None] - cum[None, :]).masked_fill(~mask, float("-inf")))
            out[a:b] = wq[:, None] * (qf[a:b] @ s) + (w * (qf[a:b] @ kf[a:b].T)) @ v[a:b]
            s = torch.exp(last) * s + (wk[:, None] * kf[a:b]).T @ v[a:b]
    close(out, o_ref)
    close(s, s_ref)
    # dL/dG_t = Q'_t . dQ'_t - K'_t . dK'_t + [t = T - 1] <dS_T, S_T>, then the reverse cumulative sum
    dq, dk = ref[0], ref[1]
    dbig = qf * dq - kf * dk if per_dim else (qf * dq).sum(-1) - (kf * dk).sum(-1)
    dbig[-1] += (ds_end * s_ref.detach()).sum(-1) if per_dim else (ds_end * s_ref.detach()).sum()
    close(dbig.flip(0).cumsum(0).flip(0), ref[4])


def test_s9_softmax_gate_gradient():
    """The Forgetting Transformer's score bias G_i - G_j: dL/dG_t = sum_j dS_tj - sum_i dS_it, dS the score
    gradient P o (dP - D) of section 6, then the reverse cumulative sum."""
    g = gen(92)
    q, k, v, do = randn(g, T, D), randn(g, T, D), randn(g, T, DV), randn(g, T, DV)
    gate = torch.nn.functional.logsigmoid(randn(g, T)).requires_grad_()
    big = gate.cumsum(0)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = (SCALE * q @ k.T + big[:, None] - big[None, :]).masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, -1)
    (dgate,) = grads(((p @ v) * do).sum(), gate)
    p = p.detach()
    dp = do @ v.T
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dbig = ds.sum(1) - ds.sum(0)
    close(dbig.flip(0).cumsum(0).flip(0), dgate)


# ---------------------------------------------------------------------------------------------
# section 10: parameters and row reductions inside a feature map
# ---------------------------------------------------------------------------------------------
def test_s10_parameters_in_a_feature_map():
    """dp = sum g dphi/dp (a number), dp_e = sum_t g_te dphi_te/dp_e (a vector), and a row scale's dp."""
    g = gen(40)
    x, up = randn(g, T, D), randn(g, T, D)  # up: the gradient reaching the feature block
    t, w, b = torch.tensor(0.7, dtype=DT), randn(g, D), randn(g, D)
    leaves = [p.clone().requires_grad_() for p in (t, w, b)]
    lt, lw, lb = leaves

    def phi(x, t, w, b):  # elu(t w x + b) + 1, times the row scale 1 / (t |x| + 1)
        row = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return (torch.nn.functional.elu(t * w * x + b) + 1) / (t * row + 1)
    ref = grads((phi(x, lt, lw, lb) * up).sum(), *leaves)
    z = t * w * x + b
    delu = torch.where(z > 0, 1.0, torch.exp(z))  # elu'(z)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    scale = 1 / (t * norm + 1)
    gs = up * scale  # the gradient reaching the element formula
    big_g = (up * (torch.nn.functional.elu(z) + 1)).sum(-1, keepdim=True)  # the gradient reaching the scale
    dt = (gs * delu * w * x).sum() + (big_g * (-norm / (t * norm + 1) ** 2)).sum()
    dw = (gs * delu * t * x).sum(0)
    db = (gs * delu).sum(0)
    for mine, want in zip((dt, dw, db), ref):
        close(mine, want)


def reverse_pass(x, up, gamma):
    """ReBased's phi = gamma (x - m) / sqrt(v + eps) + beta, m = mean(x), v = mean((x - m)**2), backward by the
    adjoints of section 10 (r1 = m read by v and phi, r2 = v read by phi), never autograd."""
    eps, d = 1e-5, x.shape[-1]
    m = x.mean(-1, keepdim=True)
    v = ((x - m) ** 2).mean(-1, keepdim=True)
    s = 1 / torch.sqrt(v + eps)
    dx = up * gamma * s  # direct: d phi / dx_e with m, v fixed
    c_m = (up * -gamma * s).sum(-1, keepdim=True)  # seeds: sum_e g_e d phi_e / d r
    c_v = (up * gamma * (x - m) * -0.5 * s ** 3).sum(-1, keepdim=True)
    cp = c_v / d  # v (outermost): u = (x - m)**2, F' = 1/d
    dx = dx + cp * 2 * (x - m)
    c_m = c_m + (cp * -2 * (x - m)).sum(-1, keepdim=True)
    dx = dx + c_m / d  # m: u = x, F' = 1/d
    dgamma = (up * (x - m) * s).sum(0)
    dbeta = up.sum(0)
    return dx, dgamma, dbeta


def test_s10_nested_row_reductions():
    g = gen(41)
    x, up = randn(g, T, D), randn(g, T, D)
    gamma, beta = randn(g, D) + 1.5, randn(g, D)
    leaves = [p.clone().requires_grad_() for p in (x, gamma, beta)]
    ln = torch.nn.functional.layer_norm(leaves[0], (D,), eps=1e-5) * leaves[1] + leaves[2]
    ref = grads((ln * up).sum(), *leaves)
    mine = reverse_pass(x, up, gamma)
    for a, b in zip(mine, ref):
        close(a, b)
    # the closed form of the layer norm's gradient
    z = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    gg = gamma * up
    closed = (gg - gg.mean(-1, keepdim=True) - z * (gg * z).mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    close(closed, ref[0])
    # norm(w x) inside the formula: phi = w x / norm(w x), u = (w x)**2, F' = 1 / (2 r)
    w = randn(g, D)
    lx, lw = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = grads(((lw * lx / torch.linalg.vector_norm(lw * lx, dim=-1, keepdim=True)) * up).sum(), lx, lw)
    r = torch.linalg.vector_norm(w * x, dim=-1, keepdim=True)
    c = (up * -w * x / r ** 2).sum(-1, keepdim=True)  # seed: d phi_e / d r = -w_e x_e / r**2
    cp = c * 0.5 / r
    dx = up * w / r + cp * 2 * w * w * x
    dw = (up * x / r + cp * 2 * w * x * x).sum(0)
    close(dx, ref[0])
    close(dw, ref[1])

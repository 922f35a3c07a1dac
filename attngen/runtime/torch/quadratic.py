"""The quadratic ordering in PyTorch: (Q K^T) V tile by tile, never the full n x n matrix.

Query tiles of BLOCK_Q rows; inside, key tiles of BLOCK_K columns. The softmax family (an exp
similarity) keeps a running max and rescales (flash-style); other similarities accumulate A V directly.
Each query tile runs under activation checkpointing, so autograd keeps one tile's scores at a time.

A window (spec key ``window: N``, the pairs |i - j| < N) restricts each query tile to the keys its rows attend
(key_range): the tiles outside are never visited, so the work is ~T * min(N, S) pairs, linear in T for a fixed N.
With autograd a windowed plan runs in WindowTiles, which keeps only its inputs and recomputes each query tile in
backward, adding the gradients into buffers allocated once, so that memory traffic is linear in T as well (a
checkpoint per tile left autograd a slice's zero-filled gradient of the whole k and v per tile and per-tile
pieces to join: linear work, but allocations of the whole input that made 32k tokens 17 % slower per token).

With autograd, a row-sum-normalised tile forms its rows of A over all keys (the recomputation keeps them for
the backward anyway) and divides through RowNormalize, whose backward takes the row term from the very
products it differentiates (see RowNormalize): O is invariant to scaling a row of A, so sum_j A_ij dA_ij = 0,
and a gradient that is a long sum over (i, j), such as ALiBi's dslope = -sum_ij dS_ij |i - j|, depends on
that cancellation holding in floating point.

Under torch.compile the tiles run inside the custom ops attngen::torch_tiles and attngen::torch_tiles_bwd
(compiled_tiles): the forward is _window_forward, the backward _tiles_backward (WindowTiles' recomputation), so
the graph holds one node each and no loop whose count depends on T.
"""
from __future__ import annotations

import functools
from itertools import repeat
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from attngen.frontend.expr import KE, QE, I, J
from attngen.ir import SimilarityClass
from attngen.runtime.evaluate import Evaluator
from attngen.runtime.torch.common import (
    PLANS,
    as_tensor,
    autograd_in_kernel,
    finish,
    lowered,
    symbol_env,
    with_rank5,
)

BLOCK_Q = 64  # query rows per tile
BLOCK_K = 64  # key columns per tile
Q_ONLY, K_ONLY = frozenset("q"), frozenset("k")
WIDE_COLUMNS = 512  # RowNormalize's backward works in float64 on this many key columns at a time


def quadratic(plan, q, k, v, env: dict, causal: bool, big: torch.Tensor | None = None, lse: bool = False):
    """O [B, H, T, Dv] (normalised) for q [B, H, T, Dk], k [B, H, S, Dk], v [B, H, S, E]; ``big`` [B, H, T] the
    cumulative sum G of a per-head gate (causal): W gains exp(G_i - G_j), a softmax score G_i - G_j. ``lse`` (a
    softmax plan: exp similarity, row sum without eps): (O, lse) with lse [B, H, T] = log sum_j A_ij, the row max
    plus the log of the shifted row sum, -inf on rows that attend no key; differentiable (RowNormalize)."""
    track = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *_tensors(env), big)
                                            if x is not None)
    window = plan.spec.window
    # the tiles in the window only, in preallocated buffers (WindowTiles); under torch.compile (only a log-sum-exp
    # call comes here then: the others run compiled_tiles) the checkpointed tile loop below, on the window's keys
    if window is not None and not torch.compiler.is_compiling():
        if track:
            names = [s for s, x in env.items() if isinstance(x, torch.Tensor) and x.requires_grad]
            return WindowTiles.apply((plan, env, causal, names, lse), q, k, v, big, *(env[s] for s in names))
        return _window_forward(plan, env, causal, q, k, v, big, lse)
    body = _normalized_tile if track and plan.normalize.kind == "rowsum" else _query_tile
    tile = functools.partial(body, plan, env, with_rank5(env), causal, lse=lse)
    s_len = k.shape[2]
    # the tiles take their rows from split blocks, not slices: the backward of a slice is a zero tensor of the
    # whole input per tile (T / BLOCK_Q of them: quadratic in T), one split's is a single cat
    rows = zip(q.split(BLOCK_Q, 2), big.split(BLOCK_Q, 2) if big is not None else repeat(None))
    outs = []
    for n, (q_tile, g_rows) in enumerate(rows):
        i0 = n * BLOCK_Q
        lo, stop = key_range(i0, q_tile.shape[2], s_len, causal, window)
        if lo >= stop:  # no key at all (S = 0, or a window past the last key)
            width = v.shape[-1] - (plan.normalize.kind == "rowsum")  # [V | 1]: the ones column is not an output
            zero = q_tile.new_zeros(*q_tile.shape[:3], width)
            outs.append((zero, q_tile.new_full(q_tile.shape[:3], float("-inf"))) if lse else zero)
            continue
        if window is None:
            args = (tile, i0, 0, s_len, q_tile, g_rows, k, v, big)
        else:  # compiled: the window's keys as slices (the graph, not Python, holds their backward)
            args = (tile, i0, lo, s_len, q_tile, g_rows, k[:, :, lo:stop], v[:, :, lo:stop],
                    None if big is None else big[:, :, lo:stop])
        if track:  # recompute the tile's scores in backward instead of keeping them
            outs.append(checkpoint(*args, use_reentrant=False))
        else:
            outs.append(args[0](*args[1:]))
    if lse:
        return torch.cat([o for o, _ in outs], 2), torch.cat([x for _, x in outs], 2)
    return torch.cat(outs, 2)


def compiled_tiles(plan, q, k, v, params: dict, causal: bool, big=None) -> torch.Tensor:
    """The tiled ordering under torch.compile: one opaque node (the custom op attngen::torch_tiles, its backward
    attngen::torch_tiles_bwd), whose fake kernel gives O's shape from q's and v's, so that the loops over tiles,
    whose count depends on T, are not traced: one graph for every length. ``params``: the call's parameters (the
    symbol environment is built inside the op from the concrete sizes); q, k, [V | 1] in the compute dtype."""
    return tiles_op(lowered(plan).key, q, k, v, big, [params[p.name] for p in plan.spec.parameters], causal)


def _window_forward(plan, env: dict, causal: bool, q, k, v, big, lse: bool = False):
    """O of a windowed plan without autograd (and of any plan in attngen::torch_tiles): each query tile on the keys
    key_range gives it (views of k, v and G: no copy), written into one preallocated output; rows that attend no key
    are 0. A row-sum plan's tile forms its scores over the tile's keys at once (_normalized_tile: fewer, larger ops
    than key tile by key tile, and the body its backward recomputes); others run _query_tile. ``lse``: (O, lse
    [B, H, T]) (see quadratic)."""
    body = _normalized_tile if plan.normalize.kind == "rowsum" else _query_tile
    tile = functools.partial(body, plan, env, with_rank5(env), causal, lse=lse)
    b, h, t, _ = q.shape
    s_len = k.shape[2]
    out = q.new_empty(b, h, t, v.shape[-1] - (plan.normalize.kind == "rowsum"))  # [V | 1]: no ones column out
    log_sum = q.new_full((b, h, t), float("-inf")) if lse else None
    for i0 in range(0, t, BLOCK_Q):
        i1 = min(t, i0 + BLOCK_Q)
        lo, stop = key_range(i0, i1 - i0, s_len, causal, plan.spec.window)
        if lo >= stop:  # a window past the last key (cross attention): these rows attend nothing and give 0
            out[:, :, i0:i1] = 0
            continue
        g_rows, g_cols = (None, None) if big is None else (big[:, :, i0:i1], big[:, :, lo:stop])
        got = tile(i0, lo, s_len, q[:, :, i0:i1], g_rows, k[:, :, lo:stop], v[:, :, lo:stop], g_cols)
        if lse:
            out[:, :, i0:i1], log_sum[:, :, i0:i1] = got
        else:
            out[:, :, i0:i1] = got
    return (out, log_sum) if lse else out


class WindowTiles(torch.autograd.Function):
    """O of a windowed plan with autograd, in memory linear in T: the forward keeps only its inputs (q, k, [V | 1],
    G and the environment's tensors that need a gradient), and the backward recomputes each query tile on its keys
    with autograd (the body the unwindowed tiles recompute under checkpointing: _normalized_tile for a row-sum
    plan, else _query_tile), so it holds one tile's graph at a time. torch.autograd.grad of the tile gives its
    dq rows and the dk, dv (dG) of its keys, added into buffers allocated once: no gradient of a slice (a zero
    tensor of the whole input per tile), no cat of per-tile pieces. Parameter gradients add up in float64. Under
    create_graph=True the same recomputation runs on slices of the saved inputs, so the gradients it returns are
    differentiable again (a gradient penalty, a Hessian-vector product).

    ``run`` is (plan, env, causal, names, lse): ``names`` the symbols of env whose tensors are the trailing inputs;
    ``lse``: the outputs are (O, lse) (see quadratic), and the backward takes the gradient of both."""

    @staticmethod
    def forward(ctx, run, q, k, v, big, *values):
        plan, env, causal, names, lse = run
        ctx.run = run
        ctx.save_for_backward(q, k, v, big, *values)
        return _window_forward(plan, {**env, **dict(zip(names, values))}, causal, q, k, v, big, lse)

    @staticmethod
    def backward(ctx, do, dlse=None):
        plan, env, causal, names, lse = ctx.run
        q, k, v, big, *values = ctx.saved_tensors
        dq, dk, dv, dg, dps = _tiles_backward(plan, env, causal, names, q, k, v, big, values, do,
                                              ctx.needs_input_grad[1:], torch.is_grad_enabled(), lse, dlse)
        return (None, dq, dk, dv, dg, *dps)


def _tiles_backward(plan, env: dict, causal: bool, names, q, k, v, big, values, do, needs, higher: bool,
                    lse: bool = False, dlse=None):
    """(dq, dk, dv, dG, [d value]) of the tiles (None where ``needs``, a flag per q, k, v, G and value, is False):
    each query tile recomputed on its keys with autograd, its gradients added into buffers allocated once.
    ``higher`` (create_graph=True, a second derivative): the tiles are recomputed on slices of the saved inputs,
    which then stay in the graph, and the gradients are differentiable. ``lse``: the tiles also gave the log row
    sums, whose gradient ``dlse`` [B, H, T] enters with do's."""
    if lse and dlse is None:
        dlse = do.new_zeros(do.shape[:3])
    leaf = _slice if higher else _leaf
    need_q, need_k, need_v, need_g, *need_p = needs
    need_x = {n for n, x in zip(("q", "k", "v", "g_rows", "g_cols"), (need_q, need_k, need_v, need_g, need_g)) if x}
    body = _normalized_tile if plan.normalize.kind == "rowsum" else _query_tile
    t = q.shape[2]
    s_len = k.shape[2]
    dq = torch.zeros_like(q) if need_q else None
    dk = torch.zeros_like(k) if need_k else None
    dv = torch.zeros_like(v) if need_v else None
    dg = torch.zeros_like(big) if need_g else None
    dps = [torch.zeros_like(x, dtype=torch.float64) if n else None for x, n in zip(values, need_p)]
    for i0 in range(0, t, BLOCK_Q):
        i1 = min(t, i0 + BLOCK_Q)
        lo, stop = key_range(i0, i1 - i0, s_len, causal, plan.spec.window)
        if lo >= stop:  # rows that attend no key: 0 whatever the inputs
            continue
        with torch.enable_grad():
            xs = {"q": leaf(q[:, :, i0:i1], need_q), "k": leaf(k[:, :, lo:stop], need_k),
                  "v": leaf(v[:, :, lo:stop], need_v)}
            if big is not None:
                xs["g_rows"], xs["g_cols"] = leaf(big[:, :, i0:i1], need_g), leaf(big[:, :, lo:stop], need_g)
            ps = [x if higher else _leaf(x, n) for x, n in zip(values, need_p)]
            env4 = {**env, **dict(zip(names, ps))}
            o = body(plan, env4, with_rank5(env4), causal, i0, lo, s_len, xs["q"], xs.get("g_rows"), xs["k"],
                     xs["v"], xs.get("g_cols"), lse=lse)
            wrt = [(n, x) for n, x in [*xs.items(), *enumerate(ps)] if x.requires_grad
                   and (n in need_x if isinstance(n, str) else need_p[n])]
            if not wrt:
                continue
            outs, upstream = ((o[0], o[1]), (do[:, :, i0:i1], dlse[:, :, i0:i1])) if lse else (o, do[:, :, i0:i1])
            grads = torch.autograd.grad(outs, [x for _, x in wrt], upstream, allow_unused=True, create_graph=higher)
        for (n, _), g in zip(wrt, grads):
            if g is None:  # the tile's output does not depend on it (e.g. a parameter its keys never reach)
                continue
            if n == "q":
                dq[:, :, i0:i1] = g
            elif n == "k":
                dk[:, :, lo:stop] += g
            elif n == "v":
                dv[:, :, lo:stop] += g
            elif n == "g_rows":
                dg[:, :, i0:i1] += g
            elif n == "g_cols":
                dg[:, :, lo:stop] += g
            else:
                dps[n] += g
    return dq, dk, dv, dg, [None if d is None else d.to(x.dtype) for d, x in zip(dps, values)]


# The tiled ordering as torch.library custom ops (compiled_tiles). A custom op takes no Python object: the plan is
# named by the key its Lowered registered (common.PLANS), a string constant of the graph.
@torch.library.custom_op("attngen::torch_tiles", mutates_args=())
def tiles_op(key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, big: Optional[torch.Tensor],
             values: list[torch.Tensor], causal: bool) -> torch.Tensor:
    """O [B, H, T, Dv] of plan PLANS[key] (q, k, [V | 1], G as quadratic takes them; ``values`` the spec's
    parameters in its order)."""
    plan = PLANS[key]
    return _window_forward(plan, _tile_env(plan, q, k, values), causal, q, k, v, big)


@tiles_op.register_fake
def _(key, q, k, v, big, values, causal):
    return q.new_empty(*q.shape[:3], v.shape[-1] - (PLANS[key].normalize.kind == "rowsum"))


@torch.library.custom_op("attngen::torch_tiles_bwd", mutates_args=())
def tiles_bwd_op(key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, big: Optional[torch.Tensor],
                 values: list[torch.Tensor], causal: bool, do: torch.Tensor,
                 needs: list[bool]) -> list[torch.Tensor]:
    """[dq, dk, dv, dG, d value ...]: the gradients of the inputs ``needs`` flags (q, k, v, G, each value), an
    empty tensor for the others. The tiles are recomputed with autograd (_tiles_backward), which runs inside this
    op's kernel only with the autograd dispatch keys enabled again (autograd_in_kernel)."""
    plan = PLANS[key]
    with autograd_in_kernel(), torch.enable_grad():
        params = [x.detach().requires_grad_(n) for x, n in zip(values, needs[4:])]
        env = _tile_env(plan, q, k, params)  # a parameter's symbol: its tensor reshaped (autograd records)
        symbols = [s for s, x in env.items() if isinstance(x, torch.Tensor) and x.requires_grad]
        inner = [env[s] for s in symbols]
        dq, dk, dv, dg, dinner = _tiles_backward(plan, env, causal, symbols, q, k, v, big,
                                                 [x.detach() for x in inner], do, [*needs[:4], *[True] * len(inner)],
                                                 False)
        wanted = [x for x in params if x.requires_grad]
        pairs = [(x, d) for x, d in zip(inner, dinner) if d is not None]
        dparams = torch.autograd.grad([x for x, _ in pairs], wanted, [d for _, d in pairs], allow_unused=True) \
            if pairs and wanted else [None] * len(wanted)
    found = dict(zip(map(id, wanted), dparams))
    grads = [dq, dk, dv, dg, *(found.get(id(x)) if n else None for x, n in zip(params, needs[4:]))]
    inputs = [q, k, v, big, *values]
    return [q.new_empty(0) if not n else torch.zeros_like(x) if g is None else g
            for g, n, x in zip(grads, needs, inputs)]


@tiles_bwd_op.register_fake
def _(key, q, k, v, big, values, causal, do, needs):
    return [torch.empty_like(x) if n else q.new_empty(0) for x, n in zip([q, k, v, big, *values], needs)]


def _tiles_setup(ctx, inputs, output):
    key, q, k, v, big, values, causal = inputs
    ctx.save_for_backward(q, k, v, big, *values)
    ctx.key, ctx.causal = key, causal
    ctx.needs = [x is not None and x.requires_grad for x in (q, k, v, big, *values)]


def _tiles_grad(ctx, do):
    q, k, v, big, *values = ctx.saved_tensors
    grads = tiles_bwd_op(ctx.key, q, k, v, big, values, ctx.causal, do, ctx.needs)
    dq, dk, dv, dg, *dvalues = (g if n else None for g, n in zip(grads, ctx.needs))
    return None, dq, dk, dv, dg, list(dvalues), None


tiles_op.register_autograd(_tiles_grad, setup_context=_tiles_setup)


def _tile_env(plan, q, k, values) -> dict:
    """The symbol environment of a call with these sizes and parameters (backend.prepare's)."""
    b, h, t, d = q.shape
    names = [p.name for p in plan.spec.parameters]
    return symbol_env(plan, t, k.shape[2], h, d, dict(zip(names, values)), q.dtype, q.device)


def _leaf(x: torch.Tensor, grad: bool) -> torch.Tensor:
    """x cut from the graph: a leaf of the tile's recomputation that collects a gradient when ``grad``."""
    return x.detach().requires_grad_(grad)


def _slice(x: torch.Tensor, grad: bool) -> torch.Tensor:
    """x as it is (a second derivative differentiates through it; its gradient is taken only when ``grad``)."""
    return x


def key_range(i0: int, tq: int, s_len: int, causal: bool, window: int | None) -> tuple:
    """[lo, stop): the keys that query rows i0 .. i0 + tq - 1 attend: up to the diagonal when causal, and within
    |i - j| < window when the spec has one (the tiles outside are skipped)."""
    lo, stop = 0, min(s_len, i0 + tq) if causal else s_len
    if window is not None:
        lo = max(0, i0 - window + 1)
        stop = stop if causal else min(s_len, i0 + tq - 1 + window)
    return lo, stop


def pair_mask(i, j, i0: int, tq: int, j0: int, j1: int, causal: bool, window: int | None) -> tuple:
    """(allowed, j) of the tile of rows i0 .. i0 + tq - 1 ([1, 1, Tq, 1] positions ``i``) and keys j0 .. j1 - 1
    ([1, 1, 1, Tk] positions ``j``): allowed [1, 1, Tq, Tk] bool, None when the tile holds only allowed pairs;
    ``j`` moved into the allowed range of each row (the diagonal when causal, the window's edges) where a pair is
    masked, so that W, finite on the allowed pairs, stays finite where it is evaluated (0 * inf in a backward
    would be NaN)."""
    near = (i0 + tq - 1) - j0 < window and (causal or (j1 - 1) - i0 < window) if window is not None else True
    if (not causal or j1 - 1 <= i0) and near:
        return None, j
    allowed = j <= i if causal else torch.ones_like(i * j, dtype=torch.bool)
    if window is not None:
        allowed = allowed & ((i - j).abs() < window)
        j = torch.maximum(j, i - (window - 1))
        j = j if causal else torch.minimum(j, i + (window - 1))
    if causal:
        j = torch.minimum(j, i)
    return allowed, j


def _empty_rows(i, s_len: int, window: int | None):
    """[1, 1, Tq, 1] bool, the rows a window leaves no key (i >= S + window - 1: cross attention past the keys), or
    None: they give 0, not 0 / 0."""
    if window is None:
        return None
    return i >= s_len + window - 1


def _gate_bias(g_rows, g_cols, allowed):
    """G_i - G_j for the tile's rows G_i [B, H, Tq] and columns G_j [B, H, Tk] ([B, H, Tq, Tk]; 0 on masked pairs,
    so it stays <= 0 and finite)."""
    diff = g_rows[:, :, :, None] - g_cols[:, :, None, :]
    return diff if allowed is None else torch.where(allowed, diff, torch.zeros((), dtype=diff.dtype,
                                                                                device=diff.device))


def _tensors(env: dict):
    return [x for x in env.values() if isinstance(x, torch.Tensor)]


def _query_tile(plan, env4: dict, env5: dict, causal: bool, i0: int, j_start: int, s_len: int, q_tile, g_rows, k, v,
                big=None, lse: bool = False):
    """Rows i0 .. i0 + Tq of O: loop over key tiles, skipping those entirely above the diagonal or outside the
    window. ``k``, ``v`` (and ``big``, G of the keys) hold the keys j_start .. of the S keys; ``g_rows`` G of the
    rows. ``lse`` (a softmax plan): (O, lse [B, H, Tq]), the running max plus the log of the ones column's sum."""
    b, h, tq, _ = q_tile.shape
    exp_class = plan.similarity.kind is SimilarityClass.EXP
    low = lowered(plan)  # closures: the score (sim_expr), log W folded into it (fold), W (weighted)
    sim_expr, log_weight, fold, weighted = low.similarity, low.log_weight, low.fold, low.weighted
    acc = q_tile.new_zeros(b, h, tq, v.shape[-1])  # [Tq, E]
    row_max = q_tile.new_full((b, h, tq, 1), float("-inf")) if exp_class else None
    i = torch.arange(i0, i0 + tq, dtype=q_tile.dtype, device=q_tile.device).view(1, 1, tq, 1)
    window = plan.spec.window
    lo, stop = key_range(i0, tq, s_len, causal, window)
    for j0 in range(lo, stop, BLOCK_K):
        j1 = min(stop, j0 + BLOCK_K)
        j = torch.arange(j0, j1, dtype=q_tile.dtype, device=q_tile.device).view(1, 1, 1, j1 - j0)
        # a tile crossing the diagonal or a window's edge: masked pairs evaluate W inside the allowed range
        allowed, j = pair_mask(i, j, i0, tq, j0, j1, causal, window)
        a0, a1 = j0 - j_start, j1 - j_start  # in the local keys
        scores = pair_values(sim_expr, env5, q_tile, k[:, :, a0:a1], plan.spec.where)  # [B, H, Tq, Tk]
        wev = Evaluator({**env4, I: i, J: j}, where=f"{plan.spec.where}: reweight")
        gate = None if big is None else _gate_bias(g_rows, big[:, :, a0:a1], allowed)
        if gate is not None and not exp_class:
            scores = scores * torch.exp(gate)
        if exp_class:
            if gate is not None:
                scores = scores + gate
            if fold and log_weight is not None:
                scores = scores + as_tensor(wev.run(log_weight), scores)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            # the max only shifts the exponent and cancels in num / den: no gradient flows through it
            new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True)).detach()
            if window is not None:  # a row with no allowed key yet (the window's edge) is not shifted: no NaN
                new_max = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)
            p = torch.exp(scores - new_max)
            if weighted:
                p = p * as_tensor(wev.run(low.weight), p)
            acc = acc * torch.exp(row_max - new_max) + p @ v[:, :, a0:a1]
            row_max = new_max
        else:
            a = scores * as_tensor(wev.run(low.weight), scores) if weighted else scores
            if allowed is not None:
                a = torch.where(allowed, a, torch.zeros_like(a))
            acc = acc + a @ v[:, :, a0:a1]
    log_sum = (row_max + torch.log(acc[..., -1:]))[..., 0] if lse else None  # log 0 = -inf on rows with no key
    empty = _empty_rows(i, s_len, window)
    if empty is not None and plan.normalize.kind == "rowsum":  # no key: 0 / 1, not 0 / 0
        acc = torch.cat([acc[..., :-1], torch.where(empty, torch.ones_like(acc[..., -1:]), acc[..., -1:])], -1)
    return (finish(acc, plan.normalize, row_max), log_sum) if lse else finish(acc, plan.normalize, row_max)


def _normalized_tile(plan, env4: dict, env5: dict, causal: bool, i0: int, j_start: int, s_len: int, q_tile, g_rows, k,
                     v, big=None, lse: bool = False):
    """Rows i0 .. i0 + Tq of a row-sum-normalised O with autograd: the tile's A [B, H, Tq, S'] over the keys
    up to the diagonal (scores computed key tile by key tile), one row max, then RowNormalize. ``lse`` (a softmax
    plan): (O, lse [B, H, Tq]), lse = the row max + RowNormalize's log row sum (-inf on rows with no key).

    ``v`` is [V | 1]; the row sum is taken from A itself, so the ones column is not used here. ``k``, ``v``, ``big``
    hold the keys j_start .. (see _query_tile)."""
    tq = q_tile.shape[2]
    exp_class = plan.similarity.kind is SimilarityClass.EXP
    low = lowered(plan)  # closures: the score (sim_expr), log W folded into it, W (weighted)
    sim_expr, log_weight, weighted = low.similarity, low.log_weight, low.weighted
    i = torch.arange(i0, i0 + tq, dtype=q_tile.dtype, device=q_tile.device).view(1, 1, tq, 1)
    window = plan.spec.window
    lo, stop = key_range(i0, tq, s_len, causal, window)
    j = torch.arange(lo, stop, dtype=q_tile.dtype, device=q_tile.device).view(1, 1, 1, stop - lo)
    # the block crossing the diagonal or a window's edge: masked pairs evaluate W inside the allowed range
    allowed, j = pair_mask(i, j, i0, tq, lo, stop, causal, window)
    a0, a1 = lo - j_start, stop - j_start  # in the local keys
    scores = torch.cat([pair_values(sim_expr, env5, q_tile, k[:, :, j0:min(a1, j0 + BLOCK_K)], plan.spec.where)
                        for j0 in range(a0, a1, BLOCK_K)], -1)  # [B, H, Tq, S']
    if big is not None:
        gate = _gate_bias(g_rows, big[:, :, a0:a1], allowed)
        scores = scores + gate if exp_class else scores * torch.exp(gate)
    # W (or log W) in float64: a parameter's gradient then sums dS_ij dW_ij/dtheta over (i, j) in float64
    wide = {s: x.to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for s, x in env4.items()}
    wev = Evaluator({**wide, I: i.to(torch.float64), J: j.to(torch.float64)}, where=f"{plan.spec.where}: reweight")
    row_max = None
    if exp_class:
        if log_weight is not None:
            scores = scores + as_tensor(wev.run(log_weight), scores).to(scores.dtype)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        row_max = scores.amax(-1, keepdim=True).detach()  # cancels in the normalisation
        if window is not None:  # a row with no allowed key: not shifted (no NaN), 0 below
            row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
        a = torch.exp(scores - row_max)
        if weighted:
            a = a * as_tensor(wev.run(low.weight), a).to(a.dtype)
    else:
        a = scores * as_tensor(wev.run(low.weight), scores).to(scores.dtype) if weighted else scores
        if allowed is not None:
            a = torch.where(allowed, a, torch.zeros_like(a))
    norm = plan.normalize
    eps = norm.eps
    if row_max is not None and eps != 0:
        eps = eps * torch.exp(-row_max)  # A carries the factor exp(-row max): eps likewise (as in finish)
    empty = _empty_rows(i, s_len, window)
    if not lse:
        return RowNormalize.apply(a, v[:, :, a0:a1, :-1], eps, norm.eps_mode == "clamp", empty)
    o, log_den = RowNormalize.apply(a, v[:, :, a0:a1, :-1], eps, norm.eps_mode == "clamp", empty, True)
    log_sum = (row_max + log_den)[..., 0]
    return o, log_sum if empty is None else torch.where(empty[..., 0], float("-inf"), log_sum)


class RowNormalize(torch.autograd.Function):
    """O = (A V) / g(r) with r = sum_j A_ij and g(r) = r + eps or max(r, eps), for A [..., T, S], V [..., S, E];
    with ``log`` also L = log g(r) [..., T, 1] (a softmax's log row sum, less the row max A was shifted by).

    Backward: dA_ij = (dP_ij - D_i) / g_i with dP_ij = dO_i . V_j and D_i = g'(r_i) (sum_j A_ij dP_ij / g_i - dL_i),
    the sum taken over the same dP_ij (accumulated in float64); dL_i / dA_ij = g'(r_i) / g_i is what turns D_i into
    D_i - dL_i (flash attention's dlse). Autograd of num / den would take D_i from
    dO_i . num_i with num = A V rounded by a different product: then the rows of dA do not cancel
    (sum_j A_ij dA_ij = 0 when eps = 0) beyond what the rounding of dP allows, and a parameter gradient that
    sums dS_ij = A_ij dA_ij against a weight growing along the row (ALiBi's |i - j|) picks up that residue
    times the weight: at T = 63 up to 1.5e-5 in float32 where the consistent form gives ~4e-6."""

    @staticmethod
    def forward(ctx, a, v, eps, clamp, empty=None, log=False):
        den = a.sum(-1, keepdim=True)
        g = _guard(den, eps, clamp, empty)
        ctx.save_for_backward(a, v)
        ctx.eps, ctx.clamp, ctx.empty = eps, clamp, empty
        return ((a @ v) / g, torch.log(g)) if log else (a @ v) / g

    @staticmethod
    def backward(ctx, do, dlog=None):
        a, v = ctx.saved_tensors
        wide = torch.float64
        eps = ctx.eps.to(wide) if isinstance(ctx.eps, torch.Tensor) else ctx.eps
        cols = [slice(c, c + WIDE_COLUMNS) for c in range(0, a.shape[-1], WIDE_COLUMNS)]  # bounds the float64 copies
        den = sum(a[..., c].to(wide).sum(-1, keepdim=True) for c in cols)
        g = _guard(den, eps, ctx.clamp, ctx.empty)
        da = dv = None
        if ctx.needs_input_grad[0]:
            dp = do @ v.transpose(-1, -2)  # [..., T, S]
            d = sum((a[..., c].to(wide) * dp[..., c].to(wide)).sum(-1, keepdim=True) for c in cols) / g
            if dlog is not None:
                d = d - dlog.to(wide)
            if ctx.clamp:
                d = torch.where(den > eps, d, torch.zeros_like(d))  # g' = 0 where the clamp holds
            da = torch.empty_like(a)
            for c in cols:
                da[..., c] = (dp[..., c].to(wide) - d) / g  # rounded to a's dtype once
        if ctx.needs_input_grad[1]:
            dv = a.transpose(-1, -2) @ (do / g.to(a.dtype))
        return da, dv, None, None, None, None


def _guard(den, eps, clamp: bool, empty=None):
    """g(r): r + eps, or max(r, eps) (eps a number or a tensor broadcasting against r); 1 on the ``empty`` rows
    (bool, broadcasting against r: rows that attend no key, whose A is 0)."""
    g = (torch.maximum(den, eps) if isinstance(eps, torch.Tensor) else den.clamp_min(eps)) if clamp else den + eps
    return g if empty is None else torch.where(empty, torch.ones_like(g), g)


def pair_values(expr, env5: dict, q_tile, k_tile, where: str) -> torch.Tensor:
    """s(q_i, k_j) for a tile as [B, H, Tq, Tk]. Vectors are [B, H, Tq, 1, D] and [B, H, 1, Tk, D];
    dot(a(q), b(k)) is a matmul, a dot that mixes q and k is a broadcast multiply-sum."""
    b, h, tq, d = q_tile.shape
    tk = k_tile.shape[2]
    cache = {}

    def dot(ev, a, bb):  # a, bb: Args (attngen.runtime.evaluate)
        if a.sides == K_ONLY and bb.sides == Q_ONLY:
            a, bb = bb, a
        key = (a.fn, bb.fn)
        if key not in cache:
            if a.sides == Q_ONLY and bb.sides == K_ONLY:
                ea, eb = as_tensor(ev(a), q_tile), as_tensor(ev(bb), q_tile)
                width = max(ea.shape[-1], eb.shape[-1])  # d, or F of a matmul(W, q)
                ea = torch.broadcast_to(ea, (b, h, tq, 1, width))[:, :, :, 0]
                eb = torch.broadcast_to(eb, (b, h, 1, tk, width))[:, :, 0]
                cache[key] = (ea @ eb.transpose(-1, -2)).unsqueeze(-1)  # [B, H, Tq, Tk, 1]
            else:
                cache[key] = (as_tensor(ev(a), q_tile) * as_tensor(ev(bb), q_tile)).sum(-1, keepdim=True)
        return cache[key]

    def norm(ev, a):
        return torch.linalg.vector_norm(as_tensor(ev(a), q_tile), dim=-1, keepdim=True)

    ev = Evaluator({**env5, QE: q_tile[:, :, :, None, :], KE: k_tile[:, :, None, :, :]}, dot, norm, where=where)
    return torch.broadcast_to(as_tensor(ev.run(expr), q_tile), (b, h, tq, tk, 1))[..., 0]

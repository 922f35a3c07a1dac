"""The torch backend on a CPU against what users would otherwise run (`python -m benchmarks cpu`): every peer is
measured in the same process and run, at 1 and 2 threads, and each table row gives the ratio.

- linear, causal `dot(q, k)/sqrt(d)` without normalisation: attngen's forward against a 20-line chunked loop
  and fla-core's pure-PyTorch `naive_chunk_linear_attn`; the forward's share of this machine's fp32 matmul rate;
  forward+backward against fla's naive function (autograd through it);
- retention (the decay class): forward and forward+backward against fla's `naive_chunk_simple_gla`;
- softmax, causal and bidirectional: attngen (which hands SDPA's own operator to SDPA) against
  F.scaled_dot_product_attention;
- decode: op.step tokens/s of every separable built-in after a context of 1k and 16k tokens, against a
  hand-written recurrent step of the same operator (its output checked equal first).
B1 H8 D64 fp32; times are the minimum over repeats (noise only adds time). fla-core is optional
(`pip install fla-core einops`); its rows say so when it is missing.
"""
from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F

import attngen

B, H, D = 1, 8, 64
CHUNK = 64
LINEAR = {"name": "linear_dot", "causal": True, "similarity": "dot(q, k) / sqrt(d)", "normalize": "none"}
DECODE_SPECS = ("linear_elu", "relu_linear", "cottention", "retention", "cosformer", "based", "polynomial2")


def best(fn, repeats: int) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs (one warm-up), in ms."""
    fn()
    out = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out * 1e3


def chunked_loop(q, k, v, c=CHUNK):
    """The 20-line causal linear attention a user writes: one chunk at a time, the state carried."""
    b, h, t, d = q.shape
    q = q * d ** -0.5
    s = q.new_zeros(b, h, d, v.shape[-1])
    out = torch.empty_like(v)
    mask = torch.ones(c, c).tril_()
    for i in range(0, t, c):
        qc, kc, vc = q[:, :, i:i + c], k[:, :, i:i + c], v[:, :, i:i + c]
        n = qc.shape[2]
        out[:, :, i:i + c] = qc @ s + ((qc @ kc.transpose(-1, -2)) * mask[:n, :n]) @ vc
        s = s + kc.transpose(-1, -2) @ vc
    return out


def _fla():
    try:
        from fla.ops.linear_attn.naive import naive_chunk_linear_attn
        from fla.ops.simple_gla.naive import naive_chunk_simple_gla
    except Exception as exc:  # noqa: BLE001 - any import failure means the peer is missing
        return None, f"fla-core not importable ({type(exc).__name__}: {exc})"
    return (naive_chunk_linear_attn, naive_chunk_simple_gla), ""


def matmul_rate(repeats: int) -> float:
    """This machine's fp32 GEMM rate at the current thread count, GFLOP/s (512 x 512 matrices)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    return 2 * 512 ** 3 / best(lambda: a @ b, max(repeats, 10)) / 1e6


def linear_flops(t: int) -> float:
    """FLOPs of the chunked causal linear forward: per token 2C(F + E) in the chunk and 4 F E through the state."""
    return B * H * t * (2 * CHUNK * 2 * D + 4 * D * D)


def linear_rows(lengths, repeats, fla):
    op = attngen.compile(LINEAR, backend="torch")
    rate = matmul_rate(repeats)
    rows = []
    for t in lengths:
        q, k, v = (torch.randn(B, H, t, D) for _ in range(3))
        ref = chunked_loop(q, k, v)
        err = (op(q, k, v) - ref).abs().max().item()
        row = {"T": t, "error_vs_loop": err, "matmul_gflops": rate}
        with torch.no_grad():
            row["attngen_fwd_ms"] = best(lambda: op(q, k, v), repeats)
            row["loop_fwd_ms"] = best(lambda: chunked_loop(q, k, v), repeats)
        row["matmul_share"] = linear_flops(t) / (row["attngen_fwd_ms"] * 1e6) / rate
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        row["attngen_fwdbwd_ms"] = best(lambda: op(*leaves).sum().backward(), repeats)
        if fla:
            naive = fla[0]
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            with torch.no_grad():
                row["fla_fwd_ms"] = best(lambda: naive(qt, kt, vt), repeats)
            fl = [x.clone().requires_grad_() for x in (qt, kt, vt)]
            row["fla_fwdbwd_ms"] = best(lambda: naive(*fl).sum().backward(), repeats)
        rows.append(row)
    return rows


def retention_rows(lengths, repeats, fla):
    if not fla:
        return []
    naive = fla[1]
    op = attngen.compile("retention", backend="torch", plan="linear")
    g = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32)))  # log gamma per head
    rows = []
    for t in lengths:
        q, k, v = (torch.randn(B, H, t, D) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        gt = g.expand(B, t, H).contiguous()
        peer = naive(qt, kt, vt, gt)
        peer = peer[0] if isinstance(peer, tuple) else peer
        row = {"T": t, "error_vs_fla": (op(q, k, v) - peer.transpose(1, 2)).abs().max().item()}
        with torch.no_grad():
            row["attngen_fwd_ms"] = best(lambda: op(q, k, v), repeats)
            row["fla_fwd_ms"] = best(lambda: naive(qt, kt, vt, gt), repeats)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        row["attngen_fwdbwd_ms"] = best(lambda: op(*leaves).sum().backward(), repeats)
        fl = [x.clone().requires_grad_() for x in (qt, kt, vt)]

        def fla_step():
            o = naive(*fl, gt)
            (o[0] if isinstance(o, tuple) else o).sum().backward()
        row["fla_fwdbwd_ms"] = best(fla_step, repeats)
        rows.append(row)
    return rows


def softmax_rows(lengths, repeats):
    rows = []
    for causal in (True, False):
        op = attngen.compile(attngen.load_spec("softmax", causal=causal), backend="torch")
        for t in lengths:
            q, k, v = (torch.randn(B, H, t, D) for _ in range(3))
            err = (op(q, k, v) - F.scaled_dot_product_attention(q, k, v, is_causal=causal)).abs().max().item()
            with torch.no_grad():
                ours = best(lambda: op(q, k, v), repeats)
                sdpa = best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), repeats)
            rows.append({"mode": "causal" if causal else "bidirectional", "T": t, "error_vs_sdpa": err,
                         "attngen_ms": ours, "sdpa_ms": sdpa})
    return rows


def _hand(name: str, m: float):
    """(q feature map, k feature map, normalisation (eps, clamp) or None, gamma [1, H, 1, 1] or None) of a
    built-in, written out by hand; maps take x [B, H, D] and the position [B] and return [B, H, F]. Constant
    factors sit on the query side, as in attngen's plans, so both steps continue the same state."""
    relu, scale = torch.relu, D ** -0.5

    def square(x):
        return (x[..., :, None] * x[..., None, :]).flatten(-2)
    heads = torch.arange(H, dtype=torch.float32).view(1, H, 1, 1)
    if name == "linear_elu":
        f = lambda x, p: F.elu(x) + 1  # noqa: E731
        return f, f, (1e-6, False), None
    if name == "relu_linear":
        f = lambda x, p: relu(x)  # noqa: E731
        return f, f, (1e-6, True), None
    if name == "cottention":
        def kf(x, p):
            c = (p.float() + 1).view(-1, 1, 1) ** -torch.sigmoid(torch.tensor(0.5))
            return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * c
        return lambda x, p: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12), kf, None, None
    if name == "retention":
        return lambda x, p: x * scale, lambda x, p: x, None, 1 - 2.0 ** (-5 - heads)
    if name == "cosformer":
        def f(x, p):
            a = (math.pi / 2 * p.float() / m).view(-1, 1, 1)
            r = relu(x)
            return torch.cat([r * torch.cos(a), r * torch.sin(a)], -1)
        return f, f, (1e-6, True), None
    if name == "based":
        def fq(x, p):
            return torch.cat([torch.ones_like(x[..., :1]), x * scale, square(x) * (scale * scale / 2)], -1)
        return fq, lambda x, p: torch.cat([torch.ones_like(x[..., :1]), x, square(x)], -1), (1e-6, False), None
    if name == "polynomial2":
        return lambda x, p: square(x) * (scale * scale), lambda x, p: square(x), (1e-6, False), None
    raise KeyError(name)


def hand_step(maps, q, k, v, s, z, pos):
    """A hand-written recurrent step: S <- gamma S + K'^T v, z <- gamma z + K', o = Q' S / den(Q' . z)."""
    fq, fk, norm, gamma = maps
    qf, kf = fq(q[:, :, 0], pos), fk(k[:, :, 0], pos)
    s = torch.addcmul(s if gamma is None else s * gamma, kf[..., None], v[:, :, 0, None, :])
    o = (qf[..., None, :] @ s)[:, :, 0]
    if norm is not None:
        z = z + kf if gamma is None else z * gamma[..., 0] + kf
        den = (qf * z).sum(-1, keepdim=True)
        o = o / (den.clamp_min(norm[0]) if norm[1] else den + norm[0])
    return o[:, :, None], s, z, pos + 1


def decode_rows(contexts, tokens, repeats):
    rows = []
    m = float(max(contexts) + tokens + 1)
    for name in DECODE_SPECS:
        spec = attngen.load_spec(name, M=m) if name == "cosformer" else attngen.load_spec(name)
        op = attngen.compile(spec, backend="torch")
        maps = _hand(name, m)
        for ctx in contexts:
            g = torch.Generator().manual_seed(ctx)
            q, k, v = (torch.randn(B, H, ctx, D, generator=g) for _ in range(3))
            with torch.no_grad():
                _, state = op(q, k, v, return_state=True)
                steps = [tuple(torch.randn(B, H, 1, D, generator=g) for _ in range(3)) for _ in range(tokens)]
                o1, st1 = op.step(*steps[0], state)
                o2, *_ = hand_step(maps, *steps[0], state.S, state.z, state.pos)
                err = (o1 - o2).abs().max().item() / max(o2.abs().max().item(), 1e-30)

                def ours():
                    st = state
                    for x in steps:
                        _, st = op.step(*x, st)

                def hand():
                    s, z, p = state.S, state.z, state.pos
                    for x in steps:
                        _, s, z, p = hand_step(maps, *x, s, z, p)
                t_ours, t_hand = best(ours, repeats), best(hand, repeats)
            rows.append({"spec": name, "context": ctx, "relative_error_vs_hand": err,
                         "attngen_tokens_per_s": tokens / t_ours * 1e3, "hand_tokens_per_s": tokens / t_hand * 1e3})
    return rows


def run(max_len: int, threads: tuple, repeats: int, tokens: int, echo=print) -> dict:
    fla, missing = _fla()
    lengths = [t for t in (4096, 16384, 32768) if t <= max_len] or [max_len]
    contexts = [c for c in (1024, 16384) if c <= max_len] or [max_len]
    results = {"threads": {}, "fla": missing or "fla-core naive functions", "shape": f"B{B} H{H} D{D} fp32"}
    for n in threads:
        torch.set_num_threads(n)
        echo(f"{n} thread(s): linear ...")
        part = {"linear": linear_rows(lengths, repeats, fla)}
        echo(f"{n} thread(s): retention ...")
        part["retention"] = retention_rows(lengths, repeats, fla)
        echo(f"{n} thread(s): softmax ...")
        part["softmax"] = softmax_rows([t for t in (1024, 4096) if t <= max_len] or [max_len], repeats)
        echo(f"{n} thread(s): decode ...")
        part["decode"] = decode_rows(contexts, tokens, repeats)
        results["threads"][n] = part
    return results


def _r(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def report(results: dict, machine: str, command: str, date: str) -> str:
    lines = [f"# CPU: attngen's torch backend against its peers ({date})", "",
             f"Machine: {machine}. Command: `{command}`. Shape {results['shape']}; peers: the 20-line chunked loop, "
             f"{results['fla']}, SDPA, hand-written recurrent steps. Times: minimum over repeats; a ratio > 1 means "
             "attngen is faster.", ""]
    for n, part in results["threads"].items():
        lines += [f"## {n} thread(s)", "", "### Causal linear attention (dot(q, k)/sqrt(d), no normalisation)",
                  "",
                  "| T | fwd attngen | fwd loop | fwd fla naive | loop / attngen | fla / attngen "
                  "| share of matmul rate | fwd+bwd attngen | fwd+bwd fla naive | fla / attngen | max err vs loop |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in part["linear"]:
            lines.append(f"| {r['T']} | {r['attngen_fwd_ms']:.1f} ms | {r['loop_fwd_ms']:.1f} ms | "
                         f"{r.get('fla_fwd_ms', 0):.1f} ms | {_r(r['loop_fwd_ms'], r['attngen_fwd_ms'])} | "
                         f"{_r(r.get('fla_fwd_ms'), r['attngen_fwd_ms'])} | {100 * r['matmul_share']:.0f}% of "
                         f"{r['matmul_gflops']:.0f} GFLOP/s | {r['attngen_fwdbwd_ms']:.1f} ms | "
                         f"{r.get('fla_fwdbwd_ms', 0):.1f} ms | {_r(r.get('fla_fwdbwd_ms'), r['attngen_fwdbwd_ms'])} "
                         f"| {r['error_vs_loop']:.1e} |")
        lin = part["linear"]
        if len(lin) > 1:
            lines += ["", f"fwd+bwd time({lin[-1]['T']}) / time({lin[0]['T']}) = "
                          f"{lin[-1]['attngen_fwdbwd_ms'] / lin[0]['attngen_fwdbwd_ms']:.2f} "
                          f"(tokens x{lin[-1]['T'] // lin[0]['T']})"]
        if part["retention"]:
            lines += ["", "### Retention (decay) against fla's naive_chunk_simple_gla", "",
                      "| T | fwd attngen | fwd fla | fla / attngen | fwd+bwd attngen | fwd+bwd fla | fla / attngen | "
                      "max err vs fla |", "|---|---|---|---|---|---|---|---|"]
            for r in part["retention"]:
                lines.append(f"| {r['T']} | {r['attngen_fwd_ms']:.1f} ms | {r['fla_fwd_ms']:.1f} ms | "
                             f"{_r(r['fla_fwd_ms'], r['attngen_fwd_ms'])} | {r['attngen_fwdbwd_ms']:.1f} ms | "
                             f"{r['fla_fwdbwd_ms']:.1f} ms | {_r(r['fla_fwdbwd_ms'], r['attngen_fwdbwd_ms'])} | "
                             f"{r['error_vs_fla']:.1e} |")
        lines += ["", "### Softmax against SDPA", "", "| mode | T | attngen | SDPA | SDPA / attngen | max err |",
                  "|---|---|---|---|---|---|"]
        for r in part["softmax"]:
            lines.append(f"| {r['mode']} | {r['T']} | {r['attngen_ms']:.1f} ms | {r['sdpa_ms']:.1f} ms | "
                         f"{_r(r['sdpa_ms'], r['attngen_ms'])} | {r['error_vs_sdpa']:.1e} |")
        lines += ["", "### Decode: op.step against a hand-written recurrent step (tokens/s)", "",
                  "| spec | context | attngen | hand-written | attngen / hand | rel. err vs hand |",
                  "|---|---|---|---|---|---|"]
        for r in part["decode"]:
            lines.append(f"| {r['spec']} | {r['context']} | {r['attngen_tokens_per_s']:.0f} | "
                         f"{r['hand_tokens_per_s']:.0f} | {_r(r['attngen_tokens_per_s'], r['hand_tokens_per_s'])} | "
                         f"{r['relative_error_vs_hand']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def to_json(results: dict) -> str:
    return json.dumps(results, indent=1, default=str)

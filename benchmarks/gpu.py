"""The GPU benchmark: attngen's generated Triton kernels against the reference implementations of the same
operators, at fla's benchmark shapes, in bf16, forward and forward + backward.

Peers (each in the layout it is fastest in; attngen runs "bthd", the layout of fla):
    linear_elu, relu_linear   fla-core's chunk_linear_attn (normalised, on the feature-mapped q, k)
    retention                 fla-core's chunk_simple_gla with the same per-head decay (log gamma)
    based                     fla-core's fused_chunk_based (feature dim 16)
    softmax                   torch SDPA with the flash backend
A peer that is not installed is a row that says so (`bash scripts/gpu_wheels.sh` downloads fla-core for an
offline GPU machine). Beside each row: the memory floor, the bytes that must cross HBM (q, k, v, o forward;
also dO, dq, dk, dv for forward + backward) over the copy bandwidth measured in the same run. Times are
medians of CUDA-event-timed runs after warm-up; ratios are attngen / peer (below 1: attngen is faster).
"""
from __future__ import annotations

import math
import platform
import statistics
from dataclasses import dataclass

import torch

import attngen
from attngen.errors import InputError

# (B, T, H, D): fla's benchmark shapes (its benchmark_training_throughput / ops benchmarks)
SHAPES = ((8, 1024, 8, 64), (8, 2048, 8, 64), (4, 4096, 16, 64), (4, 4096, 64, 128), (1, 8192, 8, 64),
          (1, 8192, 16, 128))
SPECS = ("linear_elu", "relu_linear", "retention", "based", "softmax")
FEATURE_DIM = {"based": 16}  # q and k head dim where the spec's features need it (tensor powers)


@dataclass
class Row:
    spec: str
    shape: tuple
    mode: str  # "fwd" or "fwd+bwd"
    ours_ms: float | None
    peer: str
    peer_ms: float | None
    floor_ms: float
    note: str = ""


def _time(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` CUDA-event-timed runs, after three warm-up runs."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write of a 1 GiB buffer), measured now."""
    x = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    ms = _time(lambda: y.copy_(x), 10)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def _peer(spec: str):
    """(name, fn(q, k, v) -> o) of spec's peer, in the "bthd" layout; raises ImportError when not installed."""
    if spec == "softmax":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            return o.transpose(1, 2)
        return "SDPA flash", sdpa
    if spec in ("linear_elu", "relu_linear"):
        from fla.ops.linear_attn import chunk_linear_attn
        phi = (lambda x: torch.nn.functional.elu(x) + 1) if spec == "linear_elu" else torch.relu
        return "fla chunk_linear_attn", lambda q, k, v: chunk_linear_attn(phi(q), phi(k), v, scale=1.0,
                                                                           normalize=True)[0]
    if spec == "retention":
        from fla.ops.simple_gla import chunk_simple_gla

        def simple_gla(q, k, v):  # the same per-head decay as the spec: gamma = 1 - 2**(-5 - h)
            h = torch.arange(q.shape[2], device=q.device, dtype=torch.float32)
            return chunk_simple_gla(q, k, v, g_gamma=torch.log(1 - 2.0 ** (-5.0 - h)), scale=q.shape[-1] ** -0.5)[0]
        return "fla chunk_simple_gla", simple_gla
    if spec == "based":
        from fla.ops.based import fused_chunk_based
        return "fla fused_chunk_based", lambda q, k, v: fused_chunk_based(q, k, v, use_norm=True)
    raise InputError(f"no peer for spec {spec!r}")


def _inputs(b, t, h, d, dk, grad):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (0.5 * torch.randn(b, t, h, dk, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(b, t, h, d, generator=g, device="cuda", dtype=torch.bfloat16)
    return [x.requires_grad_(grad) for x in (q, k, v)]


def _bench(fn, b, t, h, d, dk, mode, repeats) -> float:
    grad = mode == "fwd+bwd"
    q, k, v = _inputs(b, t, h, d, dk, grad)
    if not grad:
        with torch.no_grad():
            return _time(lambda: fn(q, k, v), repeats)
    do = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)

    def step():
        o = fn(q, k, v)
        torch.autograd.backward(o, do)
        for x in (q, k, v):
            x.grad = None
    return _time(step, repeats)


def run(specs=SPECS, shapes=SHAPES, repeats: int = 20, echo=print) -> tuple:
    """(rows, bandwidth GB/s, machine line) of the benchmark on this GPU."""
    if not torch.cuda.is_available():
        raise InputError("the GPU benchmark needs a CUDA GPU (torch.cuda.is_available() is False); on a CPU "
                         "machine run the CPU benchmarks (python -m benchmarks --help)")
    bw = bandwidth_gbs()
    machine = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
               f"triton {__import__('triton').__version__}, Python {platform.python_version()}")
    rows = []
    for spec in specs:
        op = attngen.compile(spec, backend="triton", layout="bthd")
        try:
            peer_name, peer = _peer(spec)
        except ImportError as exc:
            peer_name, peer = f"not installed ({exc.name})", None
        for b, t, h, d in shapes:
            dk = min(d, FEATURE_DIM.get(spec, d))
            for mode in ("fwd", "fwd+bwd"):
                tensors = 4 if mode == "fwd" else 8
                floor = b * t * h * (2 * dk + 2 * d) * 2 * tensors / 4 / (bw * 1e9) * 1e3
                row = Row(spec, (b, t, h, d), mode, None, peer_name, None, floor)
                try:
                    row.ours_ms = _bench(op, b, t, h, d, dk, mode, repeats)
                except Exception as exc:  # noqa: BLE001 - a failing case is a row, the others go on
                    row.note = f"attngen: {type(exc).__name__}: {str(exc)[:120]}"
                if peer is not None:
                    try:
                        row.peer_ms = _bench(peer, b, t, h, d, dk, mode, repeats)
                    except Exception as exc:  # noqa: BLE001
                        row.note += f" peer: {type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                echo(_line(row))
                torch.cuda.empty_cache()
    return rows, bw, machine


def _ms(x):
    return "-" if x is None else f"{x:.3f}"


def _line(r: Row) -> str:
    ratio = "-" if r.ours_ms is None or r.peer_ms is None else f"{r.ours_ms / r.peer_ms:.2f}"
    floor = "-" if r.ours_ms is None else f"{r.floor_ms / r.ours_ms:.0%}"
    b, t, h, d = r.shape
    return (f"| {r.spec} | B{b} T{t} H{h} D{d} | {r.mode} | {_ms(r.ours_ms)} | {r.peer} | {_ms(r.peer_ms)} | "
            f"{ratio} | {r.floor_ms:.3f} | {floor} | {r.note} |")


def report(rows, bw, machine, command, date) -> str:
    geo = [r.ours_ms / r.peer_ms for r in rows if r.ours_ms and r.peer_ms]
    summary = (f"geometric mean of attngen / peer over {len(geo)} rows: "
               f"{math.exp(sum(map(math.log, geo)) / len(geo)):.2f}" if geo else "no row has both timings")
    return "\n".join([
        "# GPU benchmark: attngen's Triton kernels against fla-core and SDPA (bf16)",
        "",
        f"- machine: {machine}; measured copy bandwidth {bw:.0f} GB/s",
        f"- command: `{command}`; date {date}",
        "- times: median ms of CUDA-event-timed runs after 3 warm-up runs; ratio = attngen / peer (below 1: "
        "attngen faster); floor = bytes of q, k, v, o (fwd; and dO, dq, dk, dv for fwd+bwd) / bandwidth; "
        "% floor = floor / attngen's time",
        f"- {summary}",
        "",
        "| spec | shape | mode | attngen ms | peer | peer ms | ratio | floor ms | % floor | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_line(r) for r in rows),
        "",
    ])

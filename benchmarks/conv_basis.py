"""Benchmarks of the conv_basis approximation behind `python -m benchmarks conv-basis` and `conv-basis-error`
(docs/conv_basis.md), in the style of benchmarks.common (machine, command and date in each table; anchors
measured in the same run).

    conv_basis_scaling(max_len, k)  forward time over T = 1k .. max_len next to exact causal softmax (SDPA),
                                    each case in its own subprocess (peak RSS belongs to that case)
    conv_basis_error(ks)            output error against k (1 .. 32), both searches, on random, exactly
                                    4-conv and all-MiniLM-L6-v2 q, k, v, with the time of each call
"""
from __future__ import annotations

import datetime
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

import attngen
from attngen.naive import reference
from attngen.verify import rel_rms
from benchmarks import realdata
from benchmarks.common import _fmt, _machine, _run_worker, check_measured, worker_command, write_result

CONV_BASIS_IMPLS = ("attngen-conv-basis", "sdpa")
DELTAS = (1e-3, 1.0, 4.0, 16.0, 64.0, 256.0)  # the delta sweep of conv_basis_error
LONG_CALL = 5.0  # seconds: a case whose warm-up call takes longer is timed over 2 repeats
# The timed runs use one thread (torch.set_num_threads(1)), SDPA and conv_basis alike: the CPU machine is
# shared with other jobs, and a two-thread op stalls whenever one of its threads is descheduled, which made
# two-thread timings vary by up to 6x between neighbouring lengths. One thread measures the work.
THREADS = 1


def conv_basis_spec(k: int, search: str = "binary", probe: int = 16, delta: float = 1e-3) -> dict:
    """Causal softmax (as the built-in softmax) with approx conv_basis."""
    return {"name": "softmax_conv_basis", "causal": True, "similarity": "exp(dot(q, k)/sqrt(d))",
            "normalize": "rowsum", "approx": {"kind": "conv_basis", "k": k, "probe": probe, "delta": delta,
                                              "search": search}}


def _conv_basis_worker(impl: str, t: int, k: int, b: int, h: int, d: int, repeats: int, threads: int) -> dict:
    """One (impl, T) case of conv_basis_scaling in its own process: minimum forward time, peak RSS."""
    torch.manual_seed(0)
    q, k_, v = (torch.randn(b, h, t, d) for _ in range(3))
    found = None
    if impl == "attngen-conv-basis":
        op = attngen.compile(conv_basis_spec(k), backend="torch")
        fn = lambda: op(q, k_, v)  # noqa: E731
    elif impl == "sdpa":
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k_, v, is_causal=True)  # noqa: E731
    else:
        raise ValueError(impl)
    torch.set_num_threads(threads)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    with torch.no_grad():
        start = time.perf_counter()
        fn()  # warm-up
        if time.perf_counter() - start > LONG_CALL:
            repeats = min(repeats, 2)
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    if impl == "attngen-conv-basis":
        found = op.last_basis.k
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"impl": impl, "T": t, "seconds": min(times), "repeats": repeats, "peak_rss": peak, "base_rss": base_rss,
            "k_found": found}


def conv_basis_scaling(max_len=65536, k=8, out_dir=Path("bench/results"), b=1, h=8, d=64, sdpa_max=65536,
                       repeats=5, threads=THREADS, echo=print) -> Path:
    """Forward time of causal softmax through conv_basis (k elements, binary search) vs SDPA (exact, causal),
    T = 1k .. max_len, each case in its own subprocess."""
    lengths = [1024 << s for s in range(0, 10) if (1024 << s) <= max_len]
    rows = {}
    load0 = os.getloadavg()[0]
    for t in lengths:
        for impl in CONV_BASIS_IMPLS:
            if impl == "sdpa" and t > sdpa_max:
                continue
            echo(f"  measuring {impl:<20} T={t:>6} ...", end="\r")
            cmd = worker_command("conv_basis", impl, t, k, b, h, d, repeats, threads)
            rows[(impl, t)] = _run_worker(cmd, impl, t)
    echo(" " * 60, end="\r")
    check_measured(rows, "conv-basis")
    text = _conv_basis_report(rows, lengths, k, b, h, d, max_len, repeats, threads, (load0, os.getloadavg()[0]))
    return write_result(text, out_dir, "cpu-conv-basis-scaling", echo)


def _conv_basis_report(rows, lengths, k, b, h, d, max_len, repeats, threads, load) -> str:
    cmd = f"python -m benchmarks conv-basis --conv-k {k} --max-len {max_len}"
    lines = [f"# conv_basis (k = {k}) vs exact causal softmax (SDPA), CPU", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {_machine()}", f"- command: `{cmd}`",
             f"- load average (1 min) at the start and end of the run: {load[0]:.2f}, {load[1]:.2f} (the machine "
             "is shared: other jobs only add time, so each figure is a minimum over repeats)",
             f"- shapes: B{b} H{h} D{d}, float32 inputs, random q, k, v (torch.manual_seed(0)), causal, forward "
             f"only (torch.no_grad), {threads} thread(s) (torch.set_num_threads; both implementations), minimum of "
             f"{repeats} repeats after a warm-up ({min(repeats, 2)} where the warm-up call took over {LONG_CALL:g} s)",
             f"- attngen: causal softmax with `approx: {{kind: conv_basis, k: {k}}}` (probe 16, delta 1e-3, binary "
             "search), torch backend; its FFTs run in float64 (docs/conv_basis.md). On random scores every column "
             f"differs from the previous start's, so the search finds all k = {k} elements (k' column); the time "
             "does not depend on where the starts are",
             "- SDPA: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), exact",
             "- memory: MiB allocated at the peak = peak RSS of the subprocess that ran the case minus its RSS "
             "after importing torch and creating the inputs; in brackets the raw peak RSS", "",
             "| T | conv_basis ms | k' | SDPA ms | conv_basis MiB | SDPA MiB | SDPA / conv_basis time |",
             "|---|---|---|---|---|---|---|"]

    def ok(r):
        return r is not None and "error" not in r

    for t in lengths:
        cb, sd = rows.get(("attngen-conv-basis", t)), rows.get(("sdpa", t))
        ratio = f"{sd['seconds'] / cb['seconds']:.2f}" if ok(cb) and ok(sd) else "-"
        lines.append(f"| {t} | {_fmt(cb, 'ms')} | {cb['k_found'] if ok(cb) else '-'} | {_fmt(sd, 'ms')} | "
                     f"{_fmt(cb, 'mb')} | {_fmt(sd, 'mb')} | {ratio} |")
    lines += ["", "## Checks", ""]
    measured = [t for t in lengths if ok(rows.get(("attngen-conv-basis", t)))]
    if len(measured) >= 2:
        t0 = 4096 if 4096 in measured and measured[-1] > 4096 else measured[0]
        t1 = measured[-1]
        g = rows[("attngen-conv-basis", t1)]["seconds"] / rows[("attngen-conv-basis", t0)]["seconds"]
        nlogn = t1 * math.log2(2 * t1) / (t0 * math.log2(2 * t0))
        lines.append(f"- conv_basis time T={t0} -> {t1} grows {g:.1f}x ({t1 // t0}x is linear, {nlogn:.1f}x is "
                     f"T log T, {(t1 // t0) ** 2}x quadratic; goal <= 1.5 x T log T = {1.5 * nlogn:.1f}x): "
                     f"{'PASS' if g <= 1.5 * nlogn else 'FAIL'}")
    both = [t for t in lengths if ok(rows.get(("sdpa", t))) and ok(rows.get(("attngen-conv-basis", t)))]
    if len(both) >= 2:
        s0, s1 = (rows[("sdpa", t)]["seconds"] for t in (both[0], both[-1]))
        lines.append(f"- SDPA time T={both[0]} -> {both[-1]} grows {s1 / s0:.1f}x")
        faster = [t for t in both if rows[("attngen-conv-basis", t)]["seconds"] < rows[("sdpa", t)]["seconds"]]
        lines.append(f"- conv_basis faster than SDPA at T = {', '.join(map(str, faster)) or 'none measured'}")
    return "\n".join(lines) + "\n"


def kconv_example(starts, t: int, b: int = 1, h: int = 12, d: int = 32, seed: int = 0, dtype=None):
    """q, k, v [B, H, T, D] whose scaled scores q_i . k_j / sqrt(d) = sum_{r: s_r <= j} a_r cos(w_r (i - j))
    are exactly k-conv with the given starts (docs/variants.md, "Conv-Basis"): block r of the head dim holds
    q_i = a_r sqrt(d) [cos(w_r i), sin(w_r i)], k_j = [j >= s_r] [cos(w_r j), sin(w_r j)]."""
    dtype = dtype or torch.float32
    assert 2 * len(starts) <= d
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(b, h, t, d, dtype=torch.float64)
    k = torch.zeros(b, h, t, d, dtype=torch.float64)
    i = torch.arange(t, dtype=torch.float64)
    for r, s in enumerate(starts):
        w = 0.2 + 1.2 * torch.rand(b, h, 1, generator=g, dtype=torch.float64)
        a = 2.0 * (0.5 + torch.rand(b, h, 1, generator=g, dtype=torch.float64)) * math.sqrt(d)
        on = (i >= s).to(torch.float64)
        q[..., 2 * r], q[..., 2 * r + 1] = a * torch.cos(w * i), a * torch.sin(w * i)
        k[..., 2 * r], k[..., 2 * r + 1] = torch.cos(w * i) * on, torch.sin(w * i) * on
    v = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (q, k, v))


def conv_basis_error(ks=(1, 2, 4, 8, 16, 32), seq_len=512, out_dir=Path("bench/results"), repeats=7,
                     echo=print) -> Path:
    """Output error of conv_basis against exact causal softmax (the float64 naive reference) for k in ``ks``,
    both searches, on random q, k, v, on exactly 4-conv scores, and on all-MiniLM-L6-v2's q, k, v of the
    built-in text (six layers, causal mask); with the time of each call."""
    load0 = os.getloadavg()[0]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    sets = {}
    torch.manual_seed(0)
    sets["random"] = [tuple(torch.randn(1, 12, seq_len, 32) for _ in range(3))]
    sets["4-conv"] = [kconv_example([0, seq_len // 8, seq_len // 3, seq_len // 2], seq_len)]
    minilm_note = None
    try:
        sets["MiniLM"] = [tuple(x.contiguous() for x in layer) for layer in realdata.minilm_qkv(max_tokens=seq_len)]
    except Exception as exc:  # the model package is optional (scripts/setup_bench.sh)
        minilm_note = f"MiniLM not measured: {type(exc).__name__}: {exc}"
    ref = reference("softmax")
    refs = {name: [ref(*(x.double() for x in qkv)) for qkv in data] for name, data in sets.items()}

    def timed(fn, data):
        best = float("inf")
        with torch.no_grad():
            outs = [fn(*qkv) for qkv in data]  # warm-up, and the outputs measured
            for _ in range(repeats):
                start = time.perf_counter()
                for qkv in data:
                    fn(*qkv)
                best = min(best, (time.perf_counter() - start) / len(data))
        return outs, best

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def mean_v(q, k, v):  # o_i = mean of v_0 .. v_i
        return v.cumsum(2) / torch.arange(1, v.shape[2] + 1, dtype=v.dtype).view(1, 1, -1, 1)

    results = {}
    for name, data in sets.items():
        for key, fn in (("sdpa", sdpa), ("mean", mean_v)):
            outs, sec = timed(fn, data)
            results[(name, key)] = ([rel_rms(o, r) for o, r in zip(outs, refs[name])], sec, None)
        for kk in ks:
            for search in ("binary", "scan"):
                echo(f"  {name:<8} k={kk:<3} {search:<6} ...", end="\r")
                op = attngen.compile(conv_basis_spec(kk, search), backend="torch")
                found = []

                def run(q, k, v):
                    o = op(q, k, v)
                    found.append(op.last_basis.counts.double().mean().item())
                    return o
                outs, sec = timed(run, data)
                results[(name, kk, search)] = ([rel_rms(o, r) for o, r in zip(outs, refs[name])], sec,
                                               sum(found[:len(data)]) / len(data))
    real = "MiniLM" if "MiniLM" in sets else "random"
    for delta in DELTAS:  # does a coarser delta (starts spread out) help on real scores?
        op = attngen.compile(conv_basis_spec(16, "scan", delta=delta), backend="torch")
        errs, found = [], []
        with torch.no_grad():
            for qkv, r in zip(sets[real], refs[real]):
                errs.append(rel_rms(op(*qkv), r))
                found.append(op.last_basis.counts.double().mean().item())
        results[("delta", delta)] = (errs, sum(found) / len(found))
    torch.set_num_threads(threads_before)
    echo(" " * 60, end="\r")
    text = _conv_basis_error_report(results, sets, ks, seq_len, repeats, minilm_note, real,
                                    (load0, os.getloadavg()[0]))
    return write_result(text, out_dir, "cpu-conv-basis-error", echo)


def _conv_basis_error_report(results, sets, ks, seq_len, repeats, minilm_note, real, load) -> str:
    names = list(sets)
    cmd = "python -m benchmarks conv-basis-error"
    if seq_len != 512:
        cmd += f" (conv_basis_error(seq_len={seq_len}))"
    lines = ["# conv_basis: output error against k (causal softmax, CPU)", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {_machine()}", f"- command: `{cmd}`",
             f"- load average (1 min) at the start and end of the run: {load[0]:.2f}, {load[1]:.2f} (the machine "
             "is shared: other jobs only add time, so each figure is a minimum over repeats)",
             f"- error: relative RMS of the output, RMS(o - ref) / RMS(ref), against the float64 naive reference "
             f"of causal softmax(q k^T / sqrt(d)) V; float32 inputs [1, 12, {seq_len}, 32]; probe 16, delta 1e-3",
             "- data: random = torch.randn q, k, v (seed 0); 4-conv = scores exactly 4-conv with starts "
             f"{[0, seq_len // 8, seq_len // 3, seq_len // 2]} (benchmarks.conv_basis.kconv_example); "
             "MiniLM = the q, k, v of all-MiniLM-L6-v2 on benchmarks.realdata's built-in text (each of its 6 layers, "
             "with a causal mask that the bidirectional model never had; error: mean over the layers, in brackets "
             "the max)",
             f"- k' = elements found (mean over heads and layers); ms = time per call ([1, 12, {seq_len}, 32], "
             f"float32, forward, {THREADS} thread(s), minimum over {repeats} repeats)",
             "- reference rows: SDPA (exact: its error is float32 roundoff) and the causal mean of V "
             "(o_i = mean of v_0 .. v_i, a trivial approximation) to read the errors against", ""]
    if minilm_note:
        lines += [f"- {minilm_note}", ""]
    head = "| k | search | " + " | ".join(f"{n} error | {n} k' | {n} ms" for n in names) + " |"
    lines += [head, "|" + "---|" * (2 + 3 * len(names))]

    def err(errs):
        mean = sum(errs) / len(errs)
        return f"{mean:.3g}" + (f" ({max(errs):.3g})" if len(errs) > 1 else "")

    for key, label in (("sdpa", "SDPA (exact)"), ("mean", "causal mean of V")):
        cells = " | ".join(f"{err(results[(n, key)][0])} | - | {results[(n, key)][1] * 1e3:.2f}" for n in names)
        lines.append(f"| {label} | - | {cells} |")
    for kk in ks:
        for search in ("binary", "scan"):
            cells = " | ".join(f"{err(results[(n, kk, search)][0])} | {results[(n, kk, search)][2]:.1f} | "
                               f"{results[(n, kk, search)][1] * 1e3:.2f}" for n in names)
            lines.append(f"| {kk} | {search} | {cells} |")
    lines += ["", f"delta on {real} (k = 16, scan): a coarser delta spreads the starts out", "",
              "| delta | error | k' |", "|---|---|---|"]
    for delta in DELTAS:
        errs, found = results[("delta", delta)]
        lines.append(f"| {delta:g} | {err(errs)} | {found:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    impl, t, k, b, h, d, repeats, threads = sys.argv[1:9]
    print(json.dumps(_conv_basis_worker(impl, int(t), int(k), int(b), int(h), int(d), int(repeats), int(threads))))

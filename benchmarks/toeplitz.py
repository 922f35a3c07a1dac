"""`python -m benchmarks toeplitz`: the FFT ordering against the quadratic one for a Toeplitz reweighting,
measured on this machine next to the cost model's prediction.

The cost model ranks orderings for an H100-like balance (cost.BALANCE FLOPs per byte); a CPU has another
balance, so the measured crossover may sit elsewhere. The table shows both, so the model's ranking can be
judged: below the crossover the quadratic ordering should win, above it the FFT. Times are the minimum of
``repeats`` forward passes (no autograd), fp32, torch backend, both orderings forced on the same inputs.
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path

import torch

import attngen
from attngen import pipeline
from attngen.ir import Ordering
from benchmarks.common import _machine, write_result

KERNEL = "1/(1 + abs(i - j))"


def toeplitz(out_dir=Path("bench/results"), b=1, h=2, d=32, max_len=16384, repeats=3, causal=True,
             echo=print) -> Path:
    spec = attngen.load_spec({"name": "toeplitz_inverse", "causal": causal, "similarity": "dot(relu(q), relu(k))",
                              "reweight": KERNEL, "normalize": {"kind": "rowsum", "eps": 1e-6}})
    ops = {o: attngen.compile(spec, backend="torch", plan=o.value) for o in (Ordering.QUADRATIC, Ordering.FFT)}
    plan = pipeline.plan(spec, head_dim=d)  # what the torch backend's planner chooses at this head dim
    lengths = [256 << s for s in range(0, 12) if (256 << s) <= max_len]
    rows = []
    torch.manual_seed(0)
    for t in lengths:
        q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
        times = {}
        for ordering, op in ops.items():
            echo(f"  measuring {ordering.value:<10} T={t:>6} ...", end="\r")
            with torch.no_grad():
                op(q, k, v)  # warm-up
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    op(q, k, v)
                    best = min(best, time.perf_counter() - start)
            times[ordering] = best
        rows.append((t, times[Ordering.QUADRATIC], times[Ordering.FFT], plan.choice.ordering_for(t).value))
    echo(" " * 60, end="\r")
    # the shortest length from which the FFT is faster at every longer length measured
    measured = next((t for n, (t, *_) in enumerate(rows) if all(f < q for _, q, f, _ in rows[n:])), None)
    n_star = plan.choice.crossover
    lines = [f"# Toeplitz reweighting: FFT vs quadratic ordering ({datetime.date.today().isoformat()})", "",
             f"- machine: {_machine()}",
             f"- command: `python -m benchmarks toeplitz --max-len {max_len}`",
             f"- spec: similarity dot(relu(q), relu(k)), reweight {KERNEL}, rowsum, "
             f"{'causal' if causal else 'bidirectional'}; B={b} H={h} D={d} fp32 forward, torch backend, "
             f"minimum of {repeats} runs",
             f"- cost model (d = {d}): {plan.choice.describe()}"
             + (f" (n* = {n_star:.0f})" if n_star else ""),
             f"- measured here: FFT faster from T = {measured} on" if measured else
             "- measured here: the quadratic ordering was faster at every length measured", "",
             "| T | quadratic ms | fft ms | fft / quadratic | planner picks |", "|---|---|---|---|---|"]
    for t, quad, fft, pick in rows:
        lines.append(f"| {t} | {quad * 1e3:.1f} | {fft * 1e3:.1f} | {fft / quad:.2f} | {pick} |")
    text = "\n".join(lines) + "\n"
    return write_result(text, out_dir, "cpu-toeplitz", echo)

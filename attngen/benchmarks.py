"""Benchmarks behind `attngen bench` (bench/linear_scaling.py runs the same code).

Each measurement runs in its own subprocess so that its peak RSS (resource.getrusage ru_maxrss) belongs to
that one implementation and length. Times are the minimum over repeats of the forward pass (no autograd):
on a shared, noisy machine interference only adds time.
The table compares against anchors measured in the same run: the naive reference and PyTorch's SDPA.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("attngen-linear", "reference", "sdpa")
REFERENCE_BYTES_LIMIT = 10 * 2 ** 30  # run the naive reference while its n x n tensors stay below ~10 GiB


def _worker(impl: str, spec_name: str, t: int, b: int, h: int, d: int, repeats: int) -> dict:
    import resource

    import torch

    from .naive import reference
    from .runtime import compile as compile_op
    from .spec import load_spec
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    spec = load_spec(spec_name, causal=True)
    if impl == "attngen-linear":
        op = compile_op(spec, backend="torch", plan="linear")
        fn = lambda: op(q, k, v)  # noqa: E731
    elif impl == "reference":
        fn = lambda: reference(spec)(q, k, v)  # noqa: E731
    elif impl == "sdpa":
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    else:
        raise ValueError(impl)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    with torch.no_grad():
        fn()  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the minimum of the repeats: on a shared machine, noise only ever adds time
    return {"impl": impl, "T": t, "seconds": min(times), "peak_rss": peak, "base_rss": base_rss}


def _measure(impl, spec_name, t, b, h, d, repeats) -> dict | None:
    cmd = [sys.executable, "-m", "attngen.benchmarks", impl, spec_name, str(t), str(b), str(h), str(d), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"impl": impl, "T": t, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def linear_scaling(spec_name="linear_elu", max_len=32768, out_dir=Path("bench/results"), b=1, h=8, d=64,
                   sdpa_max=16384, repeats=5, echo=print) -> Path:
    """Time and peak memory of the causal linear plan vs the reference and SDPA, T = 1k .. max_len."""
    lengths = [1024 << s for s in range(0, 10) if (1024 << s) <= max_len]
    rows = {}
    for t in lengths:
        plan = [("attngen-linear", True), ("sdpa", t <= sdpa_max),
                ("reference", 4 * b * h * t * t * 4 <= REFERENCE_BYTES_LIMIT)]
        for impl, run in plan:
            if not run:
                continue
            echo(f"  measuring {impl:<15} T={t:>6} ...", end="\r")
            rows[(impl, t)] = _measure(impl, spec_name, t, b, h, d, repeats)
    echo(" " * 60, end="\r")
    text = _report(rows, lengths, spec_name, b, h, d, max_len, repeats)
    echo(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{datetime.date.today().isoformat()}-cpu-linear-scaling.md"
    path.write_text(text)
    echo(f"written to {path}")
    return path


def _fmt(r, key):
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    if key == "ms":
        return f"{r['seconds'] * 1e3:.1f}"
    return f"{_net(r) / 2 ** 20:.0f} ({r['peak_rss'] / 2 ** 20:.0f})"


def _net(r) -> float:
    """Peak RSS above the process's RSS once torch is imported and the inputs exist: what the computation
    itself allocated at its peak."""
    return r["peak_rss"] - r["base_rss"]


def _report(rows, lengths, spec_name, b, h, d, max_len, repeats) -> str:
    cmd = f"attngen bench --spec {spec_name} --max-len {max_len}"
    lines = [f"# Causal linear plan vs naive reference vs SDPA ({spec_name}, torch backend, CPU)", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {_machine()}", f"- command: `{cmd}`",
             f"- shapes: B{b} H{h} D{d}, float32, causal, forward only (torch.no_grad), minimum of {repeats} repeats",
             "- memory: MiB allocated at the peak = peak RSS of the subprocess that ran that one case minus its RSS "
             "after importing torch and creating the inputs; in brackets the raw peak RSS (includes the ~300 MiB "
             "Python + torch baseline and the inputs)", "",
             "| T | linear ms | SDPA ms | reference ms | linear MiB | SDPA MiB | reference MiB | SDPA / linear time |",
             "|---|---|---|---|---|---|---|---|"]
    for t in lengths:
        lin, sd, ref = rows.get(("attngen-linear", t)), rows.get(("sdpa", t)), rows.get(("reference", t))
        ratio = (f"{sd['seconds'] / lin['seconds']:.2f}" if sd and lin and "error" not in sd and "error" not in lin
                 else "-")
        lines.append(f"| {t} | {_fmt(lin, 'ms')} | {_fmt(sd, 'ms')} | {_fmt(ref, 'ms')} | {_fmt(lin, 'mb')} | "
                     f"{_fmt(sd, 'mb')} | {_fmt(ref, 'mb')} | {ratio} |")
    lines += ["", "## Checks", ""]
    lines += _checks(rows, lengths)
    return "\n".join(lines) + "\n"


def _checks(rows, lengths) -> list:
    out = []

    def ok(r):
        return r is not None and "error" not in r

    lin4, lin32 = rows.get(("attngen-linear", 4096)), rows.get(("attngen-linear", 32768))
    if ok(lin4) and ok(lin32):
        g = lin32["seconds"] / lin4["seconds"]
        out.append(f"- linear time T=4k -> 32k grows {g:.1f}x (8x is linear; goal <= 12x): "
                   f"{'PASS' if g <= 12 else 'FAIL'}")
    faster = [t for t in lengths if t >= 2048 and ok(rows.get(("sdpa", t))) and ok(rows.get(("attngen-linear", t)))]
    if faster:
        wins = all(rows[("attngen-linear", t)]["seconds"] < rows[("sdpa", t)]["seconds"] for t in faster)
        out.append(f"- linear faster than SDPA at every T >= 2k measured ({', '.join(map(str, faster))}): "
                   f"{'PASS' if wins else 'FAIL'}")
    lin8, ref8 = rows.get(("attngen-linear", 8192)), rows.get(("reference", 8192))
    if ok(lin8) and ok(ref8):
        r = _net(ref8) / _net(lin8)
        raw = ref8["peak_rss"] / lin8["peak_rss"]
        out.append(f"- peak memory at T=8k: reference / linear = {r:.1f}x allocated at the peak (goal >= 20x): "
                   f"{'PASS' if r >= 20 else 'FAIL'}; raw peak RSS ratio {raw:.1f}x")
    return out or ["- not enough lengths measured for the checks"]


if __name__ == "__main__":
    impl, spec_name, t, b, h, d, repeats = sys.argv[1:8]
    print(json.dumps(_worker(impl, spec_name, int(t), int(b), int(h), int(d), int(repeats))))

"""The causal linear plan's scaling (`python -m benchmarks linear`; bench/linear_scaling.py runs the same) and
decoding (`python -m benchmarks decode`), and what every benchmark shares: the subprocess workers, the machine
line and writing a result table.

Each measurement runs in its own subprocess so that its peak RSS (resource.getrusage ru_maxrss) belongs to
that one implementation and length. Times are the minimum over repeats of the forward pass (no autograd):
on a shared, noisy machine interference only adds time.
The table compares against anchors measured in the same run: the naive reference and PyTorch's SDPA.
`python -m benchmarks decode` (``decode``) times decoding N tokens after a context of T: the recurrent step
against a softmax KV-cache decode, with the exact bytes of the state and of the cache.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import attngen
from attngen import bench
from attngen.naive import reference

REPO_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds benchmarks/: the workers' PYTHONPATH
IMPLS = ("attngen-linear", "reference", "sdpa")
REFERENCE_BYTES_LIMIT = 10 * 2 ** 30  # run the naive reference while its n x n tensors stay below ~10 GiB


class WorkerError(RuntimeError):
    """Every measurement of a benchmark failed: nothing worth a results file."""


def worker_env(extra: dict | None = None) -> dict:
    """The environment of a worker subprocess: this one's, with the repository root first on PYTHONPATH (so
    that ``python -m benchmarks.<module>`` imports from any working directory), plus ``extra``."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def worker_command(module: str, *args) -> list:
    """``python -m benchmarks.<module> args...`` with this interpreter."""
    return [sys.executable, "-m", f"benchmarks.{module}", *(str(a) for a in args)]


def _worker(impl: str, spec_name: str, t: int, b: int, h: int, d: int, repeats: int) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    spec = attngen.load_spec(spec_name, causal=True)
    if impl == "attngen-linear":
        op = attngen.compile(spec, backend="torch", plan="linear")
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
    return _run_worker(worker_command("common", impl, spec_name, t, b, h, d, repeats), impl, t)


def write_result(text: str, out_dir: Path, name: str, echo=print) -> Path:
    """Print a result table and write it to ``out_dir/<date>-<name>.md``; returns the path."""
    echo(text)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{datetime.date.today().isoformat()}-{name}.md"
    path.write_text(text)
    echo(f"written to {path}")
    return path


def _machine() -> str:
    return f"{bench.cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def linear_scaling(spec_name="linear_elu", max_len=32768, out_dir=Path("bench/results"), b=1, h=8, d=64,
                   sdpa_max=16384, repeats=5, echo=print, plot=False) -> Path:
    """Time and peak memory of the causal linear plan vs the reference and SDPA, T = 1k .. max_len. Beside the
    Markdown, the same rows as JSON (attngen.bench.Result) and with ``plot`` its PNGs (attngen.bench.plot)."""
    if plot:
        bench.check_plotting()  # before anything is measured
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
    check_measured(rows, "linear")
    text = _report(rows, lengths, spec_name, b, h, d, max_len, repeats)
    path = write_result(text, out_dir, "cpu-linear-scaling", echo)
    result = _linear_result(rows, spec_name, b, h, d, max_len, repeats)
    path.with_suffix(".json").write_text(result.to_json())
    echo(f"written to {path.with_suffix('.json')}")
    for png in bench.plot(result, path.parent, path.stem) if plot else []:
        echo(f"written to {png}")
    return path


def _linear_result(rows, spec_name, b, h, d, max_len, repeats) -> bench.Result:
    """The rows of `python -m benchmarks linear` as an attngen.bench.Result (its JSON and plots): time in ms and the
    memory allocated at the peak (the table's first memory figure) in MiB."""
    result = bench.Result(spec_name, "causal", "torch", "cpu", _machine(),
                          f"python -m benchmarks linear --spec {spec_name} --max-len {max_len}",
                          datetime.date.today().isoformat(), "float32", b, h, d,
                          "peak RSS of the subprocess that ran the case minus its RSS after importing torch and "
                          f"creating the inputs; time: the minimum of {repeats} repeats")
    for (impl, t), r in sorted(rows.items(), key=lambda item: (item[0][1], IMPLS.index(item[0][0]))):
        kind = "ordering" if impl == "attngen-linear" else "peer"
        if r is None or "error" in r:
            result.rows.append(bench.Row(impl, kind, t, None, None, (r or {}).get("error", "not run")))
        else:
            result.rows.append(bench.Row(impl, kind, t, r["seconds"] * 1e3, _net(r) / 2 ** 20))
    return result


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
    cmd = f"python -m benchmarks linear --spec {spec_name} --max-len {max_len}"
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


# ---------------------------------------------------------------------------------------------
# decode: N tokens after a context of T tokens, recurrent step vs a softmax KV cache
# ---------------------------------------------------------------------------------------------
DECODE_IMPLS = ("attngen-step", "sdpa-kv-cache")
PREFILL_PIECE = 1024  # the recurrent state of the context is built 1024 tokens at a time (initial_state)


def _decode_worker(impl: str, spec_name: str, t: int, n: int, b: int, h: int, d: int, repeats: int) -> dict:
    """Decode ``n`` tokens after a context of ``t``: the minimum over repeats of the time of all n steps.

    attngen-step: the context enters a recurrent state piece by piece (prefill with initial_state and
    return_state, never T tokens at once), then n calls of op.step. sdpa-kv-cache: a preallocated
    K/V cache of t + n rows holding the context, then n steps that write the new key and value and run
    SDPA with a query of length 1 over the cache so far.

    Memory from /proc/self/status: ``base_rss`` before the context exists, ``start_rss`` when decoding
    starts (after malloc_trim, so memory freed by building the context is not counted), ``peak_rss`` the
    high-water mark of the decode alone (VmHWM reset at its start through /proc/self/clear_refs)."""
    torch.manual_seed(0)
    tokens = [torch.randn(b, h, 1, d) for _ in range(3 * n)]  # the n decoded tokens' q, k, v
    with torch.no_grad():
        if impl == "attngen-step":
            op = attngen.compile(attngen.load_spec(spec_name, causal=True), backend="torch")
            base_rss = _proc_status("VmRSS")
            context = op.init_state(b, h, d, d)
            for a in range(0, t, PREFILL_PIECE):
                piece = [torch.randn(b, h, min(PREFILL_PIECE, t - a), d) for _ in range(3)]
                _, context = op(*piece, initial_state=context, return_state=True)

            def decode():
                state = context
                for i in range(n):
                    _, state = op.step(tokens[3 * i], tokens[3 * i + 1], tokens[3 * i + 2], state)
                return state.nbytes()
        elif impl == "sdpa-kv-cache":
            base_rss = _proc_status("VmRSS")
            k_cache, v_cache = torch.randn(b, h, t + n, d), torch.randn(b, h, t + n, d)  # rows >= t: overwritten

            def decode():
                for i in range(n):
                    k_cache[:, :, t + i:t + i + 1] = tokens[3 * i + 1]
                    v_cache[:, :, t + i:t + i + 1] = tokens[3 * i + 2]
                    torch.nn.functional.scaled_dot_product_attention(tokens[3 * i], k_cache[:, :, :t + i + 1],
                                                                     v_cache[:, :, :t + i + 1])
                return (k_cache.numel() + v_cache.numel()) * k_cache.element_size()
        else:
            raise ValueError(impl)
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what building the context freed
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        start_rss = _proc_status("VmRSS")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            state_bytes = decode()
            times.append(time.perf_counter() - start)
    return {"impl": impl, "T": t, "N": n, "seconds": min(times), "tokens_per_s": n / min(times),
            "state_bytes": state_bytes, "base_rss": base_rss, "start_rss": start_rss,
            "peak_rss": _proc_status("VmHWM")}


def _proc_status(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (VmRSS: now, VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def decode(spec_name="linear_elu", max_len=32768, tokens=64, out_dir=Path("bench/results"), b=1, h=8, d=64,
           repeats=7, echo=print) -> Path:
    """Tokens per second and memory of decoding ``tokens`` tokens after T = 1k .. max_len of context."""
    lengths = [1024 << s for s in range(0, 10) if (1024 << s) <= max_len]
    rows = {}
    for t in lengths:
        for impl in DECODE_IMPLS:
            echo(f"  measuring {impl:<15} T={t:>6} ...", end="\r")
            cmd = worker_command("common", "decode", impl, spec_name, t, tokens, b, h, d, repeats)
            rows[(impl, t)] = _run_worker(cmd, impl, t)
    echo(" " * 60, end="\r")
    check_measured(rows, "decode")
    text = _decode_report(rows, lengths, spec_name, tokens, b, h, d, max_len, repeats)
    return write_result(text, out_dir, "cpu-decode", echo)


def _run_worker(cmd, impl, t, env_extra: dict | None = None) -> dict:
    """Run one worker (``worker_command``) and parse the JSON of its last stdout line; on a failure a row
    {"impl", "T", "error": the last line of its stderr}."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(env_extra))
    if proc.returncode != 0:
        return {"impl": impl, "T": t, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_measured(rows: dict, name: str) -> None:
    """WorkerError (with the first failure's message) when no row of ``rows`` was measured."""
    if rows and all(r is not None and "error" in r for r in rows.values()):
        first = next(iter(rows.values()))
        raise WorkerError(f"{name}: every measurement failed, no results written; the first ({first['impl']}, "
                          f"T={first['T']}): {first['error']}")


def _decode_report(rows, lengths, spec_name, n, b, h, d, max_len, repeats) -> str:
    cmd = f"python -m benchmarks decode --spec {spec_name} --max-len {max_len} --tokens {n}"
    lines = [f"# Decoding {n} tokens after a context of T: recurrent step ({spec_name}) vs softmax KV cache (CPU)", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {_machine()}", f"- command: `{cmd}`",
             f"- shapes: B{b} H{h} D{d}, float32, torch.no_grad; time = minimum over {repeats} repeats of all {n} "
             "steps; tokens/s = N / that time",
             f"- attngen: op.step of the torch backend ({spec_name}, causal) from the state of the context, built "
             f"{PREFILL_PIECE} tokens at a time with initial_state/return_state; SDPA: "
             "torch.nn.functional.scaled_dot_product_attention with a query of length 1 over a preallocated "
             "K/V cache of T + N rows",
             "- memory: exact bytes of the recurrent State (S, z, pos) vs the K and V cache tensors; from "
             "/proc/self/status of the subprocess that ran the case: held = RSS when decoding starts (after "
             "malloc_trim) minus RSS before the context existed (the context's memory, plus allocator residue of "
             "building it); +decode = peak RSS while decoding (VmHWM, reset at its start) minus RSS at its start "
             "(the decode's own working memory); MiB. attngen's held memory is not its state (the exact bytes "
             "column): it is what torch and the allocator keep after the T / 1024 prefill calls (the same residue "
             "appears when the op is called on 1024-token pieces without a state); the KV cache's is the cache", "",
             "| T | attngen tok/s | SDPA tok/s | attngen / SDPA | state bytes | KV-cache bytes | attngen held | "
             "SDPA held | attngen +decode | SDPA +decode |", "|---|---|---|---|---|---|---|---|---|---|"]

    def ok(r):
        return r is not None and "error" not in r

    def mib(r, key):
        if not ok(r):
            return "-"
        value = r["start_rss"] - r["base_rss"] if key == "held" else r["peak_rss"] - r["start_rss"]
        return f"{value / 2 ** 20:.1f}"

    for t in lengths:
        a, s = rows.get(("attngen-step", t)), rows.get(("sdpa-kv-cache", t))
        speed = lambda r: f"{r['tokens_per_s']:.0f}" if ok(r) else ("error" if r else "-")  # noqa: E731
        ratio = f"{a['tokens_per_s'] / s['tokens_per_s']:.2f}" if ok(a) and ok(s) else "-"
        lines.append(f"| {t} | {speed(a)} | {speed(s)} | {ratio} | {a['state_bytes'] if ok(a) else '-'} | "
                     f"{s['state_bytes'] if ok(s) else '-'} | {mib(a, 'held')} | {mib(s, 'held')} | "
                     f"{mib(a, 'decode')} | {mib(s, 'decode')} |")
    lines += ["", "## Checks", ""]
    states = [rows[("attngen-step", t)]["state_bytes"] for t in lengths if ok(rows.get(("attngen-step", t)))]
    caches = [rows[("sdpa-kv-cache", t)]["state_bytes"] for t in lengths if ok(rows.get(("sdpa-kv-cache", t)))]
    if states:
        lines.append(f"- decode state bytes equal at every T ({states[0]} bytes): "
                     f"{'PASS' if len(set(states)) == 1 and len(states) == len(lengths) else 'FAIL'}")
    if len(caches) >= 2:
        lines.append(f"- KV cache grows with T: {caches[0]} -> {caches[-1]} bytes "
                     f"({caches[-1] / caches[0]:.1f}x for {lengths[-1] // lengths[0]}x the context)")
    mems = [rows[("attngen-step", t)]["peak_rss"] - rows[("attngen-step", t)]["start_rss"] for t in lengths
            if ok(rows.get(("attngen-step", t)))]
    if len(mems) >= 2:
        lines.append(f"- attngen's decode working memory (+decode) from the shortest to the longest context: "
                     f"{mems[0] / 2 ** 20:.1f} -> {mems[-1] / 2 ** 20:.1f} MiB")
    speeds = [rows[("attngen-step", t)]["tokens_per_s"] for t in lengths if ok(rows.get(("attngen-step", t)))]
    if len(speeds) >= 2:
        lines.append(f"- attngen tokens/s from the shortest to the longest context: {speeds[0]:.0f} -> "
                     f"{speeds[-1]:.0f} "
                     f"({speeds[-1] / speeds[0]:.2f}x; flat is constant work per token)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1] == "decode":
        impl, spec_name, t, n, b, h, d, repeats = sys.argv[2:10]
        print(json.dumps(_decode_worker(impl, spec_name, int(t), int(n), int(b), int(h), int(d), int(repeats))))
    else:
        impl, spec_name, t, b, h, d, repeats = sys.argv[1:8]
        print(json.dumps(_worker(impl, spec_name, int(t), int(b), int(h), int(d), int(repeats))))

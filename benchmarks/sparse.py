"""`python -m benchmarks sparse`: SEA-style topk_sparse attention on this machine (docs/sparse.md).

Two parts, one markdown report (bench/results/<date>-cpu-sparse.md):

1. quality: per estimator x k, the recall of the true top-k key blocks (by the exact softmax attention mass of
   each block pair), the output error against exact softmax (attngen.verify.rel_rms), the same error for the
   true top-k blocks (the oracle: what a perfect estimator would give at that k), and the forward time next
   to SDPA, measured in the same run; on random inputs and on the q, k, v of all-MiniLM-L6-v2
   (benchmarks.realdata; skipped with a note when the model is not installed).
2. memory: the forward's peak memory for T = 1k .. max_len at fixed k, next to exact softmax (SDPA and the
   torch backend's quadratic ordering), each case in its own subprocess (VmHWM reset before it runs).
"""
from __future__ import annotations

import ctypes
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import attngen
from attngen import pipeline
from attngen.approx.topk_sparse.attend import attend
from attngen.approx.topk_sparse.selection import allowed_blocks, always_blocks, pool, select_blocks
from attngen.verify import rel_rms
from benchmarks import realdata
from benchmarks.common import _machine, _proc_status, _run_worker, check_measured, worker_command, write_result

ESTIMATORS = ("cosformer", "linear_elu", "relu_linear", "based")
KS = (1, 2, 4, 8)
MEMORY_IMPLS = ("topk_sparse", "sdpa", "quadratic")
QUADRATIC_MAX = 16384  # the torch quadratic ordering loops over tiles in Python: slow beyond this on a CPU
# one intra-op thread for every implementation: on a small machine shared with other jobs, two OpenMP threads
# wait for each other at every op whenever one is descheduled (seconds instead of milliseconds)
THREADS = 1


def sparse_spec(estimator: str, k: int, block: int, causal: bool, first: int = 1, diagonal: bool = True):
    """The built-in softmax spec with approx: topk_sparse."""
    return attngen.load_spec("softmax", causal=causal, approx={
        "kind": "topk_sparse", "estimator": estimator, "k": k, "block": block,
        "always_keep": {"diagonal": diagonal, "first": first}})


def true_block_mass(q, k, block: int, causal: bool):
    """sum_{i in I, j in J} softmax(q k^T / sqrt(d))_ij per block pair, [B, H, NQB, NKB], in float64, one head
    at a time (materialises T x S per head: for evaluation at moderate T only)."""
    out = []
    for h in range(q.shape[1]):
        qh, kh = q[:, h:h + 1].double(), k[:, h:h + 1].double()
        s = qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5  # [B, 1, T, S]
        if causal:
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
        a = torch.softmax(s, -1)
        rows = pool(a, block)  # [B, 1, NQB, S]
        out.append(pool(rows.transpose(-1, -2), block).transpose(-1, -2))
    return torch.cat(out, 1)


def _min_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)  # on a shared machine noise only ever adds time


def _recall(sel, truth, approx, causal: bool):
    """(hits, wanted, expected hits of a random choice) over the contested query blocks: those with more
    candidates (allowed, not always-kept) than k, where the choice matters."""
    cand = allowed_blocks(sel.n_q, sel.n_k, approx.block, causal) & ~always_blocks(approx, sel.n_q, sel.n_k, causal)
    n_cand = cand.sum(-1)  # [NQB]
    contested = n_cand > approx.k
    bh = sel.counts.shape[0] * sel.counts.shape[1]
    hits = (sel.block_mask() & truth.block_mask() & cand).sum(-1)[..., contested].sum()
    # a uniformly random choice of k among n candidates finds k * k / n of the k true blocks on average
    return int(hits), approx.k * int(contested.sum()) * bh, float((approx.k ** 2 / n_cand[contested]).sum()) * bh


def quality_setting(name: str, cases: list, causal: bool, block: int, repeats: int = 3, echo=print) -> dict:
    """Rows (estimator, k) -> measures for the inputs ``cases`` (a list of (q, k, v), fp32 [B, H, T, D])."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        exact = [sdpa(q.double(), k.double(), v.double(), is_causal=causal) for q, k, v in cases]
        masses = [true_block_mass(q, k, block, causal) for q, k, _ in cases]
        sdpa_s = sum(_min_time(lambda: sdpa(q, k, v, is_causal=causal), repeats) for q, k, v in cases)
    rows = {}
    for est in ESTIMATORS:
        for kk in KS:
            echo(f"  {name}: {est} k={kk} ...", end="\r")
            spec = sparse_spec(est, kk, block, causal)
            op = attngen.compile(spec, backend="torch")
            plan = pipeline.plan(spec, head_dim=cases[0][0].shape[-1])
            hits = wanted = rand = 0.0
            outs, oracle, density, seconds = [], [], [], 0.0
            with torch.no_grad():
                for (q, k, v), mass in zip(cases, masses):
                    seconds += _min_time(lambda: op(q, k, v), repeats)
                    outs.append(op(q, k, v))
                    sel = op.last_selection
                    truth = select_blocks(mass, spec.approximation, causal, q.shape[2], k.shape[2])
                    oracle.append(attend(plan, q, k, v, truth))
                    h, w, r = _recall(sel, truth, spec.approximation, causal)
                    hits, wanted, rand = hits + h, wanted + w, rand + r
                    density.append(sel.density())
            ref = torch.cat([e.flatten() for e in exact])
            rows[est, kk] = {
                "recall": hits / wanted if wanted else float("nan"),
                "random": rand / wanted if wanted else float("nan"),
                "error": rel_rms(torch.cat([o.flatten() for o in outs]), ref),
                "oracle": rel_rms(torch.cat([o.flatten() for o in oracle]), ref),
                "density": sum(density) / len(density), "ms": seconds / len(cases) * 1e3,
                "sdpa_ms": sdpa_s / len(cases) * 1e3}
    echo(" " * 70, end="\r")
    return rows


def _quality_table(title: str, note: str, rows: dict) -> list:
    lines = [f"### {title}", "", note, "",
             "| estimator | k | kept / allowed blocks | recall of true top-k | random choice's recall | output error | "
             "true top-k's error | ms / call | SDPA ms | time / SDPA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (est, kk), r in rows.items():
        lines.append(f"| {est} | {kk} | {r['density']:.2f} | {r['recall']:.3f} | {r['random']:.3f} | "
                     f"{r['error']:.3f} | {r['oracle']:.3f} | {r['ms']:.1f} | {r['sdpa_ms']:.1f} | "
                     f"{r['ms'] / r['sdpa_ms']:.1f} |")
    return lines + [""]


def quality(echo=print, repeats: int = 3) -> list:
    """The quality tables: random inputs (causal) and MiniLM's q, k, v (bidirectional and causal)."""
    lines = []
    torch.manual_seed(0)
    t, h, d, block = 2048, 8, 64, 64
    rand = [tuple(torch.randn(1, h, t, d) for _ in range(3))]
    rows = quality_setting("random", rand, True, block, repeats, echo)
    lines += _quality_table(f"Random inputs: causal, B1 H{h} T{t} D{d} (q, k, v ~ N(0, 1)), block {block}",
                            _setting_note(t, block, True), rows)
    if not realdata.available():
        return lines + ["### all-MiniLM-L6-v2", "",
                        f"not measured: the model is not installed ({realdata.INSTALL_COMMAND})", ""]
    layers = realdata.minilm_qkv(max_tokens=512)
    t, block = layers[0][0].shape[2], 32
    for causal in (False, True):
        rows = quality_setting(f"MiniLM {'causal' if causal else 'bidirectional'}", layers, causal, block, repeats,
                               echo)
        mode = "causal mask applied to the encoder's q, k, v" if causal else "bidirectional, as the model runs"
        lines += _quality_table(f"all-MiniLM-L6-v2 q, k, v, layers 1-6 ({mode}): B1 H12 T{t} D32, block {block}",
                                _setting_note(t, block, causal) + " Errors over the 6 layers' outputs together; "
                                "times per layer.", rows)
    return lines


def _setting_note(t: int, block: int, causal: bool) -> str:
    n = -(-t // block)
    return (f"{n} query blocks x {n} key blocks; always kept: the first key block and the diagonal. Recall counts "
            f"only query blocks with more than k candidates{' (causal: early blocks have few)' if causal else ''}.")


# ---------------------------------------------------------------------------------------------
# memory: T = 1k .. max_len at fixed k, one subprocess per case
# ---------------------------------------------------------------------------------------------
# glibc keeps freed heap memory around and reuses it unevenly (the RSS after a call drifts by tens of MiB from
# call to call): in the memory subprocesses every allocation of 64 KiB or more is its own mmap, returned to the
# system when freed, so the RSS follows the live tensors. Times are taken in separate subprocesses without it.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}


def _memory_worker(what: str, impl: str, t: int, b: int, h: int, d: int, k: int, block: int, repeats: int) -> dict:
    """what = "memory": the peak RSS of one forward call above the RSS before it (after a warm-up call and
    malloc_trim; VmHWM reset through /proc/self/clear_refs). what = "time": the minimum of ``repeats`` calls."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    q, kk, v = (torch.randn(b, h, t, d) for _ in range(3))
    if impl == "topk_sparse":
        op = attngen.compile(sparse_spec("cosformer", k, block, True), backend="torch")
        fn = lambda: op(q, kk, v)  # noqa: E731
    elif impl == "quadratic":
        op = attngen.compile("softmax", backend="torch", plan="quadratic")
        fn = lambda: op(q, kk, v)  # noqa: E731
    elif impl == "sdpa":
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, v, is_causal=True)  # noqa: E731
    else:
        raise ValueError(impl)
    with torch.no_grad():
        if what == "time":
            return {"impl": impl, "T": t, "seconds": _min_time(fn, repeats)}
        fn()  # warm-up: one-time costs (imports, plans, code pages) are not the forward's memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        start_rss = _proc_status("VmRSS")
        fn()
        return {"impl": impl, "T": t, "start_rss": start_rss, "peak_rss": _proc_status("VmHWM")}


def memory(max_len: int = 32768, b: int = 1, h: int = 8, d: int = 64, k: int = 4, block: int = 64,
           repeats: int = 3, echo=print) -> tuple:
    """(rows, lengths): peak memory and time of the forward per (impl, T), each measured in its own subprocess."""
    lengths = [1024 << s for s in range(0, 10) if (1024 << s) <= max_len]
    rows = {}
    for t in lengths:
        for impl in MEMORY_IMPLS:
            if impl == "quadratic" and t > QUADRATIC_MAX:
                continue
            row = {"impl": impl, "T": t}
            for what, env in (("memory", MEMORY_ENV), ("time", None)):
                echo(f"  {what}: {impl:<12} T={t:>6} ...", end="\r")
                cmd = worker_command("sparse", what, impl, t, b, h, d, k, block, repeats)
                result = _run_worker(cmd, impl, t, env)
                if "error" in result:
                    row = result
                    break
                row.update(result)
            rows[impl, t] = row
    echo(" " * 70, end="\r")
    check_measured(rows, "sparse (memory)")
    return rows, lengths


def _memory_table(rows: dict, lengths: list, b, h, d, k, block, repeats) -> list:
    def ok(r):
        return r is not None and "error" not in r

    def mib(r):
        return f"{(r['peak_rss'] - r['start_rss']) / 2 ** 20:.0f}" if ok(r) else ("error" if r else "-")

    def ms(r):
        return f"{r['seconds'] * 1e3:.0f}" if ok(r) else ("error" if r else "-")

    lines = [f"### Forward memory and time vs T (causal, B{b} H{h} D{d}, float32, torch.no_grad)", "",
             f"topk_sparse: softmax with estimator cosformer, block {block}, k = {k} (+ first block + diagonal), torch "
             "backend. Exact softmax: PyTorch SDPA (is_causal) and attngen's quadratic ordering (torch backend, "
             f"tiles of 64 with online softmax, up to T = {QUADRATIC_MAX}). Memory: MiB from the RSS before one "
             "forward call (inputs created, a warm-up call done, malloc_trim; VmHWM reset through "
             "/proc/self/clear_refs) to its peak, in a subprocess where glibc serves allocations >= 64 KiB by mmap "
             "(MALLOC_MMAP_THRESHOLD_=65536, MALLOC_ARENA_MAX=1) so that the RSS follows the live tensors. Time: "
             f"minimum of {repeats} repeats after a warm-up, ms, in a separate subprocess (default allocator).", "",
             "| T | topk_sparse MiB | SDPA MiB | quadratic MiB | topk_sparse ms | SDPA ms | quadratic ms | "
             "SDPA / topk_sparse time |", "|---|---|---|---|---|---|---|---|"]
    for t in lengths:
        s, a, qd = rows.get(("topk_sparse", t)), rows.get(("sdpa", t)), rows.get(("quadratic", t))
        ratio = f"{a['seconds'] / s['seconds']:.2f}" if ok(s) and ok(a) else "-"
        lines.append(f"| {t} | {mib(s)} | {mib(a)} | {mib(qd)} | {ms(s)} | {ms(a)} | {ms(qd)} | {ratio} |")
    lines += ["", "Checks:", ""]
    sp = [(t, rows[("topk_sparse", t)]) for t in lengths if ok(rows.get(("topk_sparse", t)))]
    if len(sp) >= 2:
        (t0, r0), (t1, r1) = sp[0], sp[-1]
        net0, net1 = r0["peak_rss"] - r0["start_rss"], r1["peak_rss"] - r1["start_rss"]
        lines.append(f"- topk_sparse memory T = {t0} -> {t1} ({t1 // t0}x): {net0 / 2 ** 20:.0f} -> "
                     f"{net1 / 2 ** 20:.0f} MiB ({net1 / max(net0, 1):.1f}x; linear is {t1 // t0}x, quadratic "
                     f"{(t1 // t0) ** 2}x)")
        lines.append(f"- topk_sparse time T = {t0} -> {t1}: {r0['seconds'] * 1e3:.0f} -> {r1['seconds'] * 1e3:.0f} ms "
                     f"({r1['seconds'] / r0['seconds']:.1f}x)")
    sd = [(t, rows[("sdpa", t)]) for t in lengths if ok(rows.get(("sdpa", t)))]
    if len(sd) >= 2:
        (t0, r0), (t1, r1) = sd[0], sd[-1]
        lines.append(f"- SDPA time T = {t0} -> {t1}: {r0['seconds'] * 1e3:.0f} -> {r1['seconds'] * 1e3:.0f} ms "
                     f"({r1['seconds'] / r0['seconds']:.1f}x)")
    return lines + [""]


def sparse(max_len: int = 32768, out_dir=Path("bench/results"), echo=print) -> Path:
    """Run both parts and write the report; returns its path."""
    torch.set_num_threads(THREADS)
    cmd = f"python -m benchmarks sparse --max-len {max_len}"
    lines = ["# topk_sparse (SEA-style sparse attention): recall, error, time and memory (torch backend, CPU)", "",
             f"- date: {datetime.date.today().isoformat()}", f"- machine: {_machine()}", f"- command: `{cmd}`",
             f"- threads: {THREADS} intra-op thread for every implementation (torch.set_num_threads), times the "
             "minimum of repeats after a warm-up: the machine is shared with other jobs",
             "- errors: relative RMS (attngen.verify.rel_rms) against exact softmax attention (SDPA in float64); "
             "recall: the fraction of the true top-k key blocks (the k candidates with the largest exact softmax "
             "attention mass, always-kept blocks excluded) that the estimator chose; true top-k's error: the output "
             "error with exactly those blocks kept (what a perfect estimator would reach at this k)", ""]
    lines += ["## Quality", ""] + quality(echo)
    b, h, d, k, block, repeats = 1, 8, 64, 4, 64, 3
    rows, lengths = memory(max_len, b, h, d, k, block, repeats, echo)
    lines += ["## Memory", ""] + _memory_table(rows, lengths, b, h, d, k, block, repeats)
    return write_result("\n".join(lines), out_dir, "cpu-sparse", echo)


if __name__ == "__main__":
    what, impl, t, b, h, d, k, block, repeats = sys.argv[1:10]
    print(json.dumps(_memory_worker(what, impl, *(int(x) for x in (t, b, h, d, k, block, repeats)))))

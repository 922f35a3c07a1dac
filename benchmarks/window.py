"""`python -m benchmarks window`: a causal softmax spec with `window: 256` on the torch backend, T = 4k .. 32k.

The window's tiles visit ~T * (window + 64) pairs (docs/specs.md, "window"), so time should grow linearly in T:
the table gives the forward (no autograd) and the forward + backward (o.sum().backward() through q, k, v) times,
each the minimum of ``repeats`` rounds over every length (interleaved, so that a slow spell of a shared machine
does not fall on one length), fp32 on this machine's CPU, and the ratio of the longest to the shortest
length against the ratio of the lengths (8 for 4k -> 32k; full causal attention would be 64).

``memory=True`` (`--memory`) adds what one forward + backward allocates, which a busy machine does not change:
the tensors its ops create (counted under a TorchDispatchMode: every op output on a storage none of the op's
inputs hold, so views and in-place results are not counted), their bytes, the bytes of those of 1 MiB or more
(tensors the size of a whole q, k or v: fresh pages for the allocator). (A peak resident size is not given: the
allocator keeps and reuses what earlier calls freed, so the process's peak RSS says little about one call.)
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attngen
from attngen.runtime.torch.quadratic import BLOCK_Q, key_range
from benchmarks.common import _machine, write_result

LIMIT = 9.0  # acceptance: time(T = 8 x T0) / time(T0) at most this (linear: 8; full attention: 64)
LARGE = 2**20  # --memory: the bytes in tensors of 1 MiB or more, counted apart


def window_spec(window: int):
    return attngen.load_spec({"name": "sliding_window", "causal": True, "similarity": "exp(dot(q, k) * scale)",
                              "normalize": "rowsum", "window": window})


def _keys_per_query(t: int, window: int) -> float:
    """The key columns the torch tiles score per query row (their own bounds, key_range): ~window + 64."""
    total = 0
    for i0 in range(0, t, BLOCK_Q):
        tq = min(t, i0 + BLOCK_Q) - i0
        lo, stop = key_range(i0, tq, t, True, window)
        total += tq * (stop - lo)
    return total / t


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class _Allocations(TorchDispatchMode):
    """The tensors the ops run under it allocate: outputs on a storage that none of the op's inputs hold; ``large``
    the bytes of those of LARGE bytes or more (at 4k tokens and more, tensors the size of a whole input)."""

    def __init__(self):
        super().__init__()
        self.count, self.bytes, self.large = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in held:
                held.add(x.untyped_storage().data_ptr())
                size = x.untyped_storage().nbytes()
                self.count += 1
                self.bytes += size
                self.large += size if size >= LARGE else 0
        return out


def _memory(fn) -> tuple:
    """(tensors allocated, their bytes, the bytes of those of LARGE bytes or more) of one call of ``fn``."""
    with _Allocations() as counted:
        fn()
    return counted.count, counted.bytes, counted.large


def window_scaling(out_dir=Path("bench/results"), window=256, b=1, h=4, d=64, min_len=4096, max_len=32768, repeats=5,
                   threads=None, command="python -m benchmarks window", echo=print, memory=False) -> Path:
    if threads is not None:
        torch.set_num_threads(threads)
    spec = window_spec(window)
    op = attngen.compile(spec, backend="torch")
    lengths = [min_len << s for s in range(0, 16) if (min_len << s) <= max_len]
    torch.manual_seed(0)
    with torch.no_grad():  # warm-up: the plan, the tiles' first allocations
        op(*(torch.randn(b, h, 256, d) for _ in range(3)))
    inputs = {t: [torch.randn(b, h, t, d) for _ in range(3)] for t in lengths}
    leaves = {t: [x.clone().requires_grad_() for x in xs] for t, xs in inputs.items()}

    def both(xs):
        for x in xs:
            x.grad = None
        op(*xs).sum().backward()
    fwd, bwd = dict.fromkeys(lengths, float("inf")), dict.fromkeys(lengths, float("inf"))
    for r in range(repeats):  # rounds over every length: a slow spell of a shared machine hits all of them alike
        for t in lengths:
            echo(f"  round {r + 1}/{repeats}: T={t} ...")
            with torch.no_grad():
                fwd[t] = min(fwd[t], _best(lambda: op(*inputs[t]), 1))
            bwd[t] = min(bwd[t], _best(lambda: both(leaves[t]), 1))
    mem = {t: _memory(lambda: both(leaves[t])) for t in lengths} if memory else {}
    rows = [(t, fwd[t], bwd[t]) for t in lengths]
    (t0, f0, b0), (t1, f1, b1) = rows[0], rows[-1]
    growth = t1 / t0
    verdict = "PASS" if max(f1 / f0, b1 / b0) <= LIMIT * growth / 8 else "FAIL"
    lines = [f"# Sliding window attention on the torch backend ({datetime.date.today().isoformat()})", "",
             f"- machine: {_machine()}, torch threads {torch.get_num_threads()}",
             f"- command: `{command}`",
             f"- spec: causal softmax, similarity exp(dot(q, k) * scale), normalize rowsum, window {window}; "
             f"B={b} H={h} D={d} fp32, torch backend (the tiled quadratic ordering; key tiles outside the window "
             f"skipped), minimum of {repeats} interleaved rounds",
             "- forward + backward: o.sum().backward() through q, k and v",
             f"- T = {t1} / T = {t0}: forward {f1 / f0:.2f}x, forward + backward {b1 / b0:.2f}x for {growth:g}x the "
             f"length (linear: {growth:g}x; full causal attention: {growth**2:g}x); acceptance <= "
             f"{LIMIT * growth / 8:g}x: {verdict}", "",
             "| T | keys scored per query | forward ms | forward + backward ms | forward ms / 1k tokens | "
             "fwd + bwd ms / 1k tokens |" + (" fwd + bwd tensors allocated | MiB allocated | MiB / 1k tokens | "
                                            "MiB in tensors >= 1 MiB |" if memory else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|---|" if memory else "")]
    for t, fwd, both_ in rows:
        line = (f"| {t} | {_keys_per_query(t, window):.1f} | {fwd * 1e3:.1f} | {both_ * 1e3:.1f} | "
                f"{fwd * 1e6 / t:.2f} | {both_ * 1e6 / t:.2f} |")
        if memory:
            count, size, large = mem[t]
            line += f" {count} | {size / 2**20:.1f} | {size / 2**20 * 1024 / t:.2f} | {large / 2**20:.1f} |"
        lines.append(line)
    return write_result("\n".join(lines) + "\n", out_dir, "window", echo)

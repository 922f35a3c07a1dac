"""`python -m benchmarks cp`: the traffic of context parallelism (attngen.distributed.cp_attention) on gloo ranks.

``world`` ranks are spawned on this machine's CPU (torch.multiprocessing, gloo); for each total length T each rank
holds T / world tokens and runs cp_attention forward and backward (sum(o).backward()) under count_traffic(), which
records every collective's tensor as each rank hands it over. The table gives the bytes per rank per layer (one
cp_attention call) for T = 8k .. 128k: they should not change with T (the exchanged states are F x Dv per head).
The cost model's table (``cost_rows``) puts the all-gather of states next to ring attention (each rank passing its
K, V block of T / P tokens around the ring, P - 1 steps) for 8 .. 64 ranks.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import _machine, write_result

CASES = (("linear_elu", True), ("retention", True), ("gla", True), ("linear_elu", False), ("retention", False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, folder: str, lengths: list, b: int, h: int, d: int,
               repeats: int) -> None:
    import torch.distributed as dist

    import attngen
    from attngen.distributed import count_traffic, cp_attention
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    try:
        for name, causal in CASES:
            op = attngen.compile(attngen.load_spec(name, causal=causal), backend="torch")
            for t in lengths:
                local = t // world
                gen = torch.Generator().manual_seed(1000 * rank + t)
                q, k, v = (torch.randn(b, h, local, d, generator=gen).requires_grad_() for _ in range(3))
                kw = {}
                if op.spec.gate is not None:
                    kw["g"] = torch.nn.functional.logsigmoid(torch.randn(b, h, local, d, generator=gen) + 3)
                def timed(fn):
                    best = float("inf")
                    for _ in range(repeats):
                        dist.barrier()  # every rank starts together (they share this machine's cores)
                        start = time.perf_counter()
                        fn()
                        best = min(best, time.perf_counter() - start)
                    return best

                with torch.no_grad():
                    cp_fwd = timed(lambda: cp_attention(op, q, k, v, **kw))
                    op_fwd = timed(lambda: op(q, k, v, **kw))
                op_both = timed(lambda: op(q, k, v, **kw).sum().backward())
                with count_traffic() as traffic:
                    cp_both = timed(lambda: cp_attention(op, q, k, v, **kw).sum().backward())
                by_kind = {}
                for c in traffic.calls:
                    handed, sent = by_kind.get(c.kind, (0, 0))
                    by_kind[c.kind] = (handed + c.nbytes, sent + c.sent)
                for kind in by_kind:  # count_traffic saw every repeat: per call
                    by_kind[kind] = tuple(x // repeats for x in by_kind[kind])
                rows.append({"spec": name, "mode": op.spec.mode, "t": t, "local": local, "kinds": by_kind,
                             "seconds": {"cp_fwd": cp_fwd, "op_fwd": op_fwd, "cp_both": cp_both, "op_both": op_both}})
    finally:
        dist.destroy_process_group()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(rows))


def measure(world: int, lengths: list, b: int, h: int, d: int, repeats: int) -> list:
    """Per rank, the rows of _rank_main (bytes by collective kind, the best time of forward + backward)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world, _free_port(), folder, lengths, b, h, d, repeats), nprocs=world, join=True)
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]


def state_bytes(heads: int, width: int, dv: int, rowsum: bool, decay: str | None, itemsize: int = 4) -> int:
    """The payload one rank hands to the all-gather of one layer: the state (S | z) [H, F, Dv (+1)] and, with a
    decay or a gate, its log decay over the shard [H, F] (causal); bidirectional with a decay sends two states."""
    e = dv + rowsum
    return itemsize * (heads * width * e + (heads * width if decay else 0))


def cost_rows(worlds=(8, 16, 32, 64), tokens=131072, heads=32, kv_heads=32, d=128, kv_itemsize=2) -> list:
    """(P, ring bytes sent per rank, ring steps, all-gather bytes sent per rank, all-gather steps) per layer, forward
    (the backward doubles ring attention's traffic: K, V again and the dK, dV blocks; the states' backward is one
    reduce-scatter of the same size as the forward all-gather). Ring: P - 1 point-to-point steps, each passing a
    block of T / P tokens' K and V (kv_heads x 2d values of kv_itemsize bytes). States: a causal linear_elu-like
    spec (F = d, S | z in fp32), one all-gather: (P - 1) x the state in the ring algorithm, P - 1 steps of the
    collective's ring (log2 P with recursive doubling)."""
    state = state_bytes(heads, d, d, True, None)
    rows = []
    for p in worlds:
        block = tokens // p * kv_heads * 2 * d * kv_itemsize
        rows.append((p, (p - 1) * block, p - 1, (p - 1) * state, p - 1, int(p).bit_length() - 1, state, block))
    return rows


def report(ranks: list, world: int, b: int, h: int, d: int, repeats: int, command: str, date: str) -> str:
    rows = ranks[0]
    lines = [f"# Context parallelism: bytes per rank per layer ({date})", "",
             f"- machine: {_machine()}; {world} gloo ranks on this CPU (torch.multiprocessing), one torch thread each",
             f"- command: `{command}`",
             f"- B={b} H={h} D={d} fp32, each rank a shard of T / {world} tokens; one cp_attention call (a layer), "
             "forward and backward (sum(o).backward()); bytes as rank 0 handed them to each collective "
             "(count_traffic); 'sent' is what the ring algorithm of that collective sends per rank "
             "((P - 1) x the payload for an all-gather or reduce-scatter, 2 (P - 1) / P x for an all-reduce); "
             f"times: the slowest rank's best of {repeats} (all ranks at once on this machine's cores, so each rank "
             "runs slower than alone), of cp_attention and of the op on the same shard alone (no exchange, positions "
             "from 0: what the shard costs on one device)", ""]
    verdicts = []
    for name, mode in dict.fromkeys((r["spec"], r["mode"]) for r in rows):
        mine = [r for r in rows if r["spec"] == name and r["mode"] == mode]
        kinds = sorted({k for r in mine for k in r["kinds"]})
        lines += [f"## {name} ({mode})", "",
                  "| T total | T per rank | " + " | ".join(f"{k}: handed / sent (bytes)" for k in kinds)
                  + " | fwd s: cp / shard alone | fwd + bwd s: cp / shard alone |", "|---" * (len(kinds) + 4) + "|"]
        for r in mine:
            slow = {key: max(next(x for x in rank if x["spec"] == name and x["mode"] == mode and x["t"] == r["t"])
                             ["seconds"][key] for rank in ranks) for key in r["seconds"]}
            cells = " | ".join(f"{r['kinds'].get(k, (0, 0))[0]:,} / {r['kinds'].get(k, (0, 0))[1]:,}" for k in kinds)
            lines.append(f"| {r['t']:,} | {r['local']:,} | {cells} | {slow['cp_fwd']:.3f} / {slow['op_fwd']:.3f} | "
                         f"{slow['cp_both']:.3f} / {slow['op_both']:.3f} |")
        same = all(r["kinds"] == mine[0]["kinds"] for r in mine)
        verdicts.append(same)
        lines += ["", f"bytes equal at every T: {'PASS' if same else 'FAIL'}", ""]
    lines += ["## Cost model: one layer, P ranks, T = 128k tokens, H = 32, d = 128", "",
              "Ring attention passes each rank's K, V block (T / P tokens, bf16) around the ring: P - 1 steps. "
              "The all-gather of states hands one state (S | z: H x d x (d + 1) fp32 = "
              f"{state_bytes(32, 128, 128, True, None):,} bytes) to one collective. Forward only; the backward "
              "doubles ring attention's (K, V and dK, dV) and is one reduce-scatter of the states' size here.", "",
              "| P | ring: bytes sent per rank | ring: steps | states: bytes sent per rank | states: collective "
              "steps (ring / recursive doubling) | ratio ring / states |", "|---|---|---|---|---|---|"]
    for p, ring, ring_steps, states, steps, log_steps, _, _ in cost_rows():
        lines.append(f"| {p} | {ring:,} | {ring_steps} | {states:,} | {steps} / {log_steps} | {ring / states:.1f}x |")
    lines += ["", "Ring attention's bytes per rank grow with T (here (P - 1) / P x T x H x 2d x 2 bytes); the states' "
              "do not depend on T at all."]
    return "\n".join(lines) + "\n", all(verdicts)


def cp_traffic(out_dir=Path("bench/results"), world=4, min_len=8192, max_len=131072, b=1, h=4, d=32, repeats=1,
               command="python -m benchmarks cp", echo=print) -> Path:
    lengths = [min_len << s for s in range(0, 12) if (min_len << s) <= max_len]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    echo(f"spawning {world} gloo ranks: T = {lengths} ...")
    ranks = measure(world, lengths, b, h, d, repeats)
    text, ok = report(ranks, world, b, h, d, repeats, command, datetime.date.today().isoformat())
    return write_result(text, out_dir, "cp-traffic", echo)

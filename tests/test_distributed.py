"""Context parallelism (attngen.distributed.cp_attention) on gloo ranks spawned on the CPU: every rank's output shard
and every gradient (q, k, v, gates, learnable parameters) against the single-process op on the whole sequence.

One spawn per world size (2 and 4 ranks) checks every case; the ranks write what they found to a JSON file per
rank and the test reads them. Shards are small (T_local 24..48) to keep the spawns fast."""
from __future__ import annotations

import datetime
import json
import math
import os
import socket
import warnings
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attngen
from attngen.errors import InputError

H, D = 2, 8
ROPE = {"name": "rope_linear", "causal": True, "similarity": "dot(elu(q) + 1, elu(k) + 1)", "rotary": {"theta": 10000},
        "normalize": {"kind": "rowsum", "eps": 1.0e-6, "eps_mode": "add"}}  # rotary positions on a separable spec


def _case(name, spec, causal, *, B=2, dtype=torch.float64, params=None, gate=None, cu=None, layout="bhtd",
          kv_heads=H, lengths=None, backend="torch", grads=None):
    return dict(name=name, spec=spec, causal=causal, B=B, dtype=dtype, params=params or {}, gate=gate, cu=cu,
                layout=layout, kv_heads=kv_heads, lengths=lengths, backend=backend, grads=grads)


def _cases(world: int) -> list:
    t = 32 * world  # T_local = 32
    cos = {"M": 2 * t}
    cases = []
    for causal in (True, False):
        mode = "causal" if causal else "bidirectional"
        cases += [
            _case(f"linear_elu {mode}", "linear_elu", causal),
            _case(f"cosformer M fixed {mode}", ("cosformer", cos), causal),
            _case(f"cottention {mode}", "cottention", causal, params={"m": True}),
            _case(f"retention {mode}", "retention", causal),
            _case(f"linear_elu packed {mode}", "linear_elu", causal, B=1, cu=sorted({0, 5, 40, t // 2, t - 7, t})),
            _case(f"retention packed {mode}", "retention", causal, B=1, cu=[0, 3, t - 3, t]),
            _case(f"cottention packed {mode}", "cottention", causal, B=1, cu=[0, 33, t], params={"m": True}),
            _case(f"rotary {mode}", ROPE, causal),
        ]
    cases += [
        _case("cosformer default M bidirectional", "cosformer", False),
        _case("simple_gla causal", "simple_gla", True, gate="head"),
        _case("gla causal", "gla", True, gate="key_dim"),
        _case("gla causal fp32", "gla", True, gate="key_dim", dtype=torch.float32),
        _case("linear_elu causal fp32 bthd", "linear_elu", True, dtype=torch.float32, layout="bthd"),
        _case("simple_gla packed causal", "simple_gla", True, gate="head", B=1, cu=[0, 20, 31, t - 10, t]),
        _case("linear_elu grouped kv causal", "linear_elu", True, kv_heads=1),
        # only q needs a gradient: the states need none, yet every rank must enter the backward's collective
        _case("linear_elu causal dq only", "linear_elu", True, grads=("q",)),
        _case("retention bidirectional dq only", "retention", False, grads=("q",)),
        _case("linear_elu bidirectional dq only", "linear_elu", False, grads=("q",)),
        _case("retention unequal shards causal", "retention", True, lengths=[24 + 8 * (r % 2) for r in range(world)]),
    ]
    return cases


def _triton_cases(world: int) -> list:
    """The generated kernels (under the Triton interpreter on a CPU): the middle ranks run the op twice."""
    return [_case("retention causal triton", "retention", True, dtype=torch.float32, B=1, backend="triton",
                  lengths=[16] * world)]


def _inputs(case, world: int):
    """The whole sequence's inputs (the same on every rank: one seed per case) in bhtd, and the shard lengths."""
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    lengths = case["lengths"] or [32] * world
    t, b, dt = sum(lengths), case["B"], case["dtype"]
    q = torch.randn(b, H, t, D, generator=gen, dtype=dt)
    k = torch.randn(b, case["kv_heads"], t, D, generator=gen, dtype=dt)
    v = torch.randn(b, case["kv_heads"], t, D, generator=gen, dtype=dt)
    w = torch.randn(b, H, t, D, generator=gen, dtype=dt)  # the loss's weights: loss = sum(o * w)
    gate = None
    if case["gate"] is not None:
        shape = (b, H, t) if case["gate"] == "head" else (b, H, t, D)
        gate = torch.nn.functional.logsigmoid(torch.randn(*shape, generator=gen, dtype=dt) + 2.0)
    params = {}
    if case["params"].get("m"):
        params["m"] = torch.randn(H, generator=gen, dtype=dt)
    return q, k, v, w, gate, params, lengths


def _lay(x, layout):
    return x.transpose(1, 2).contiguous() if layout == "bthd" and x.dim() >= 3 else x


def _op(case):
    spec = case["spec"]
    spec = attngen.load_spec(spec[0], causal=case["causal"], **spec[1]) if isinstance(spec, tuple) \
        else attngen.load_spec(spec, causal=case["causal"])  # a built-in name or a dict
    return attngen.compile(spec, backend=case["backend"], layout=case["layout"])


def _run(op, case, q, k, v, gate, params, cu, fn):
    """o and the gradients of sum(o * w) with respect to the leaves given (bhtd in, bhtd out)."""
    lay = case["layout"]
    leaves = {"q": q, "k": k, "v": v, **({"g": gate} if gate is not None else {}), **params}
    leaves = {n: x.detach().clone().requires_grad_(case["grads"] is None or n in case["grads"])
              for n, x in leaves.items()}
    kw = {n: x for n, x in leaves.items() if n not in "qkv"}
    if gate is not None:
        kw["g"] = _lay(leaves["g"], lay)
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu)
    o = fn(_lay(leaves["q"], lay), _lay(leaves["k"], lay), _lay(leaves["v"], lay), **kw)
    o = o.transpose(1, 2) if lay == "bthd" else o
    return o, leaves


def _rel(out, ref) -> float:
    if out.shape != ref.shape or not bool(torch.isfinite(out).all()):
        return math.inf
    return float((out - ref).double().pow(2).mean().sqrt() / max(float(ref.double().pow(2).mean().sqrt()), 1e-2))


def _check_cases(rank: int, world: int, cases: list) -> list:
    from attngen.distributed import count_traffic, cp_attention
    rows = []
    for case in cases:
        op = _op(case)
        q, k, v, w, gate, params, lengths = _inputs(case, world)
        a, b = sum(lengths[:rank]), sum(lengths[:rank + 1])
        # the reference: the op on the whole sequence, one process
        o_ref, ref = _run(op, case, q, k, v, gate, params, case["cu"], op)
        (o_ref * w).sum().backward()
        def sl(x, a=a, b=b):
            return x[:, :, a:b]
        shard_gate = None if gate is None else sl(gate)
        with count_traffic() as traffic:
            o, got = _run(op, case, sl(q), sl(k), sl(v), shard_gate, params, case["cu"],
                          lambda *x, **kw: cp_attention(op, *x, **kw))
            (o * sl(w)).sum().backward()
        errs = {"o": _rel(o.detach(), sl(o_ref.detach()))}
        for n, x in got.items():
            if not x.requires_grad:
                continue
            g = x.grad if x.grad is not None else torch.zeros_like(x)
            if n in params:  # replicated parameters: the ranks' gradients add up
                dist.all_reduce(g)
                errs[f"d{n}"] = _rel(g, ref[n].grad)
            else:
                errs[f"d{n}"] = _rel(g, sl(ref[n].grad))
        kinds = sorted({c.kind for c in traffic.calls})
        nbytes = {c.kind: c.nbytes for c in traffic.calls}
        rows.append({"case": case["name"], "dtype": str(case["dtype"]), "errs": errs, "kinds": kinds,
                     "bytes": nbytes})
    return rows


def _check_errors(rank: int, world: int) -> list:
    """What cp_attention raises for bad calls (on every rank)."""
    from attngen.distributed import cp_attention
    out = []

    def expect(name, fn):
        try:
            fn()
            out.append({"case": name, "raised": None})
        except InputError as e:
            out.append({"case": name, "raised": str(e)})

    x = torch.randn(1, H, 16, D)
    softmax = attngen.compile("softmax", backend="torch")
    expect("softmax", lambda: cp_attention(softmax, x, x, x))
    op = attngen.compile("linear_elu", backend="torch")
    y = torch.randn(1, H, 16, D if rank == 0 else D * 2)  # rank 0's head dim differs
    expect("head dims differ", lambda: cp_attention(op, y, y, y))
    z = torch.randn(1, H + (rank == world - 1), 16, D)  # the last rank's query heads differ
    expect("heads differ", lambda: cp_attention(op, z, z, z))
    expect("cu_seqlens short", lambda: cp_attention(op, x, x, x, cu_seqlens=torch.tensor([0, 10, 16])))
    cos = attngen.compile("cosformer", backend="torch")  # M = max(n_q, n_k): no state
    expect("cosformer default M causal", lambda: cp_attention(cos, x, x, x))
    bad = torch.randn(1, H, 16 + rank, D)  # one rank's k is longer than its q: refused there, every rank stops
    expect("one rank refused", lambda: cp_attention(op, x, bad if rank == 1 else x, bad if rank == 1 else x))
    # and the exchange still works after the refusals (no rank left waiting in a collective)
    o = cp_attention(op, x, x, x)
    out.append({"case": "after", "raised": None if o.shape == x.shape else "shape"})
    return out


def _check_layers(rank: int, world: int) -> list:
    """attngen.nn.Attention(context_parallel=True) on this rank's shard of x against the same layer (same weights)
    on the whole x in this process: the output shard, dx and every weight's gradient summed over the ranks."""
    from attngen.nn import Attention
    rows = []
    for name, layout in (("gla", "bthd"), ("retention", "bhtd"), ("linear_elu", "bthd")):
        torch.manual_seed(zlib.crc32(name.encode()))
        whole = Attention(name, embed_dim=16, num_heads=H, num_kv_heads=H, layout=layout, backend="torch",
                          dtype=torch.float64)
        cp = Attention(name, embed_dim=16, num_heads=H, layout=layout, backend="torch", dtype=torch.float64,
                       context_parallel=True)
        cp.load_state_dict(whole.state_dict())
        t = 16 * world
        x = torch.randn(2, t, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        w = torch.randn(2, t, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
        a, b = rank * 16, rank * 16 + 16
        xw, xs = x.clone().requires_grad_(), x[:, a:b].clone().requires_grad_()
        (whole(xw) * w).sum().backward()
        o = cp(xs)
        (o * w[:, a:b]).sum().backward()
        errs = {"o": _rel(o.detach(), whole(x).detach()[:, a:b]), "dx": _rel(xs.grad, xw.grad[:, a:b])}
        ref = dict(whole.named_parameters())
        for n, p in cp.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)  # each rank holds its shard's share of a weight's gradient
            errs[f"d{n}"] = _rel(g, ref[n].grad)
        try:
            cp(xs, use_cache=True)
            refused = None
        except InputError as e:
            refused = str(e)
        rows.append({"case": name, "errs": errs, "refused": refused})
    return rows


def _worker(rank: int, world: int, port: int, folder: str, triton: bool = False) -> None:
    torch.set_num_threads(1)
    # a collective that one rank never enters fails after the timeout instead of hanging the test run
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=180))
    try:
        if triton:
            result = {"cases": _check_cases(rank, world, _triton_cases(world))}
        else:
            result = {"cases": _check_cases(rank, world, _cases(world)), "errors": _check_errors(rank, world),
                      "layers": _check_layers(rank, world)}
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        # every rank done before any closes its connections: a rank that tore its group down (and exited) while a
        # peer's gloo threads still read from it aborted that peer now and then ("terminate called without an
        # active exception", SIGABRT, seen under pytest-xdist on 2 busy cores)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, folder, port: int, *args) -> None:
    """Run _worker on ``world`` ranks. A rank that aborts after every rank wrote its results (in gloo's teardown:
    "terminate called without an active exception", seen now and then under pytest-xdist on 2 busy cores) leaves
    complete results, which the tests then check: a warning, not an error; any other failure is raised."""
    try:
        mp.spawn(_worker, args=(world, port, str(folder), *args), nprocs=world, join=True)
    except mp.ProcessExitedException as exc:
        if not all((folder / f"rank{r}.json").exists() for r in range(world)):
            raise
        warnings.warn(f"a rank exited abnormally after every rank wrote its results ({exc}); checking them")


@pytest.fixture(scope="module", params=[2, 4])
def spawned(request, tmp_path_factory):
    world = request.param
    folder = tmp_path_factory.mktemp(f"cp{world}")
    _spawn(world, folder, _free_port())
    return world, [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


TOL = {"torch.float64": 1e-10, "torch.float32": 2e-5}


def test_outputs_and_gradients_match_the_whole_sequence(spawned):
    world, ranks = spawned
    names = [c["name"] for c in _cases(world)]
    failures = []
    for rank, result in enumerate(ranks):
        assert [c["case"] for c in result["cases"]] == names
        for c in result["cases"]:
            expected = {"o", "dq", "dk", "dv"} if "dq only" not in c["case"] else {"o", "dq"}
            assert expected <= set(c["errs"]), c
            for what, err in c["errs"].items():
                if not err <= TOL[c["dtype"]]:
                    failures.append(f"rank {rank}/{world} {c['case']} {what}: {err:.3g}")
    assert not failures, "\n".join(failures)


def test_gates_and_parameters_get_gradients(spawned):
    world, ranks = spawned
    by_name = {c["case"]: c for c in ranks[-1]["cases"]}
    assert "dg" in by_name["simple_gla causal"]["errs"] and "dg" in by_name["gla causal"]["errs"]
    assert "dm" in by_name["cottention causal"]["errs"] and "dm" in by_name["cottention bidirectional"]["errs"]


def test_collectives_used(spawned):
    """Bidirectional without a decay or packing: one all-reduce of the states; everything else one all-gather (and
    the backward's reduce-scatter); the shapes checked first. The state's bytes: H x F x (Dv + 1) values per batch
    row for linear_elu (F = D)."""
    world, ranks = spawned
    cases = {c["name"]: c for c in _cases(world)}
    for c in ranks[0]["cases"]:
        case = cases[c["case"]]
        summed = not case["causal"] and case["cu"] is None and case["spec"] != "retention"
        assert c["kinds"] == (["all_reduce", "all_reduce_grad", "meta"] if summed
                              else ["all_gather", "meta", "reduce_scatter"]), c
    elu = next(c for c in ranks[0]["cases"] if c["case"] == "linear_elu causal")
    assert elu["bytes"] == {"all_gather": 2 * H * D * (D + 1) * 8, "reduce_scatter": 2 * H * D * (D + 1) * 8,
                            "meta": 9 * 8}


def test_bad_inputs_are_refused_on_every_rank(spawned):
    world, ranks = spawned
    for result in ranks:
        got = {e["case"]: e["raised"] for e in result["errors"]}
        assert "softmax" in got["softmax"] and "no recurrent state" in got["softmax"]
        assert "head dim of q and k differs across the ranks" in got["head dims differ"]
        assert "query heads differs across the ranks" in got["heads differ"]
        assert "cu_seqlens ends at 16" in got["cu_seqlens short"]
        assert "final sequence length" in got["cosformer default M causal"] or "M" in got["cosformer default M causal"]
        assert got["one rank refused"] is not None
        assert got["after"] is None
    refused = ranks[0]["errors"][5]["raised"]
    assert "rank(s) [1] refused" in refused


def test_the_nn_layer_with_context_parallel(spawned):
    """attngen.nn.Attention(context_parallel=True): every rank's output shard, dx and the weights' gradients (q, k, v,
    o and gate projections, the spec's parameters; summed over the ranks) equal the whole-sequence layer's."""
    world, ranks = spawned
    failures = []
    for rank, result in enumerate(ranks):
        assert [r["case"] for r in result["layers"]] == ["gla", "retention", "linear_elu"]
        for r in result["layers"]:
            assert {"o", "dx", "dq_proj.weight", "do_proj.weight"} <= set(r["errs"]), r
            assert r["case"] != "gla" or "dgate_proj.g.weight" in r["errs"], r
            assert r["refused"] is not None and "context_parallel" in r["refused"]
            failures += [f"rank {rank}/{world} {r['case']} {what}: {err:.3g}" for what, err in r["errs"].items()
                         if not err <= 1e-10]
    assert not failures, "\n".join(failures)


def test_without_a_process_group():
    op = attngen.compile("linear_elu", backend="torch")
    x = torch.randn(1, H, 8, D)
    from attngen.distributed import cp_attention
    with pytest.raises(InputError, match="not initialised"):
        cp_attention(op, x, x, x)


@pytest.mark.slow  # ~15-30 s: three ranks each loading the generated module and interpreting its kernels
def test_the_generated_kernels_on_three_ranks(tmp_path):
    """backend="triton": the op's first run (return_state) and second run (initial_state) on the middle rank."""
    _spawn(3, tmp_path, _free_port(), True)
    failures = []
    for rank in range(3):
        (c,) = json.loads((tmp_path / f"rank{rank}.json").read_text())["cases"]
        assert {"o", "dq", "dk", "dv"} <= set(c["errs"]) and c["kinds"] == ["all_gather", "meta", "reduce_scatter"]
        failures += [f"rank {rank}/3 {c['case']} {what}: {err:.3g}" for what, err in c["errs"].items()
                     if not err <= TOL[c["dtype"]]]
    assert not failures, "\n".join(failures)


def test_a_group_of_one_rank_is_the_op():
    """World size 1 (a HashStore group in this process): the op's own output, causal and bidirectional."""
    from attngen.distributed import cp_attention
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for causal in (True, False):
            op = attngen.compile(attngen.load_spec("retention", causal=causal), backend="torch")
            q, k, v = (torch.randn(1, H, 40, D, dtype=torch.float64) for _ in range(3))
            assert _rel(cp_attention(op, q, k, v), op(q, k, v)) <= 1e-12
    finally:
        dist.destroy_process_group()

"""`attngen aot`: compile the kernels of generated Triton modules ahead of time for NVIDIA GPUs, without a GPU.

Two child processes per module, so that this process imports neither torch nor triton:

1. capture (``TRITON_INTERPRET=1``): the module's public functions run on small CPU tensors, forward and
   backward, at each head dim and dtype: the quadratic and the linear ordering (forced through ``crossover``),
   initial_state + return_state, cu_seqlens (alone and with a state), the chunk-parallel causal scan (host.SCAN
   set to "parallel"), the decode step, block-sparse tables
   (blocks of SPARSE_BLOCKS). Each kernel's ``run`` is wrapped on its instance to record every launch the
   shared host (attngen.runtime.triton.host) makes: tensor dtypes and 16-byte alignment, integers, floats and
   constexprs, as the host really passes them (block sizes, flags, num_warps / num_stages / maxnreg when given).
2. compile (no interpreter): each recorded launch is specialised as Triton's launcher would
   (``create_function_from_signature`` and ``JITFunction._pack_args``, Triton internals) for
   ``GPUTarget("cuda", <arch>, 32)``, distinct specialisations are compiled once with ``triton.compile`` down to
   the cubin (ptxas from the triton wheel), registers and spill stores read from the ``ptxas -v`` log, shared
   memory from ``compiled.metadata.shared``.

This process then rates each configuration: ``ok``, ``smem`` (more shared memory than the arch gives a block:
the launch would raise OutOfResources) or ``error`` (the capture or the compilation failed, with its message).
A kernel that no host call launches (the decode step of a module whose host refuses it) is named, not compiled.
The head dim of a row is v's; q and k stop at the module's ``max_power_dim`` (tensor-power features).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from attngen.build import Module, write
from attngen.errors import InputError

# the most dynamic shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SMEM_LIMIT = {"sm_90": 232448, "sm_80": 166912}  # H100 / H200, A100
DTYPES = ("bfloat16", "float16", "float32")
KEYS = ("module", "kernel", "arch", "dtype", "head_dim", "status", "regs", "spill_bytes", "shared_bytes")
SPARSE_BLOCKS = (64, 128)  # the dense tile and the largest block the host accepts
LENGTH = 64  # tokens of the captured calls: the largest chunk and tile sizes the host picks
HEADS = 2


@dataclass(frozen=True)
class Source:
    """A generated module to compile: its name (<spec>_<mode>) and file."""
    name: str
    path: Path


@dataclass
class Row:
    """One compiled configuration (a distinct specialisation of a kernel at one arch, dtype and head dim)."""
    module: str
    kernel: str
    arch: str
    dtype: str
    head_dim: int | None
    status: str
    regs: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None
    launch: str = ""  # constexprs, num_warps / num_stages and the host calls that launch it (table only)

    def as_json(self) -> dict:
        out = {k: getattr(self, k) for k in KEYS}
        if self.status == "error":
            out["error"] = self.error
        return out


@dataclass
class Result:
    """A module's rows, the kernels no host call launched, and the seconds its capture and compile took."""
    source: Source
    rows: list = field(default_factory=list)
    not_launched: list = field(default_factory=list)
    seconds: tuple = (0.0, 0.0)


def sources(modules: list, files: list, folder: Path) -> list:
    """Sources of rendered modules (attngen.build.Module with a source: written to ``folder``) and of module
    files (paths of generated modules, as they are)."""
    out = [Source(m.filename[:-3], write(m, folder)) for m in modules if isinstance(m, Module)]
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise InputError(f"{f}: no such module file; expected a generated module (.py), a spec file or a "
                             "built-in spec name")
        out.append(Source(path.stem, path))
    return out


def kernel_text(module: Module) -> str:
    """The module's Triton kernels with its spec name written as a placeholder: two modules with the same text hold
    the same kernels (e.g. a term of a spec with terms and the built-in it equals), which compile alike."""
    text = module.source
    start, end = text.find("@triton.jit"), text.find("\nMODULE = host.register(")
    return text[start:end].replace(module.spec.name, "<spec>") if start >= 0 and end > start else text


def distinct(modules: list) -> tuple:
    """(the modules whose kernels differ from every earlier one's, {a skipped module: the one it equals})."""
    seen, keep, same = {}, [], {}
    for m in modules:
        key = kernel_text(m)
        if key in seen:
            same[m] = seen[key]
        else:
            seen[key] = m
            keep.append(m)
    return keep, same


def check(archs: list, dtypes: list) -> None:
    """InputError for an arch without a known shared memory limit or a dtype the Triton host does not take."""
    for a in archs:
        if a not in SMEM_LIMIT:
            raise InputError(f"arch {a!r}: expected one of {', '.join(SMEM_LIMIT)}")
    for d in dtypes:
        if d not in DTYPES:
            raise InputError(f"dtype {d!r}: expected one of {', '.join(DTYPES)}")


def run(srcs: list, archs: list, head_dims: list, dtypes: list, *, smem_limit: int | None = None, jobs: int = 1,
        progress=None) -> list:
    """Capture and compile every module of ``srcs`` (``jobs`` modules at a time); a list of Result in the order of
    ``srcs``. ``smem_limit`` replaces SMEM_LIMIT for every arch; ``progress(line)`` hears of each finished module."""
    check(archs, dtypes)
    results = {}
    with tempfile.TemporaryDirectory(prefix="attngen-aot-") as tmp, ThreadPoolExecutor(max(1, jobs)) as pool:
        todo = {pool.submit(_module, s, Path(tmp) / f"{i}", archs, head_dims, dtypes, smem_limit): s
                for i, s in enumerate(srcs)}
        for n, done in enumerate(as_completed(todo), 1):
            r = done.result()
            results[todo[done]] = r
            if progress:
                progress(f"[{n}/{len(srcs)}] {_describe(r)}")
    return [results[s] for s in srcs]


def _describe(r: Result) -> str:
    counts = {}
    for row in r.rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    text = f"{r.source.name}: {len(r.rows)} configurations"
    if counts:
        text += " (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")"
    text += f"; capture {r.seconds[0]:.0f} s, compile {r.seconds[1]:.0f} s"
    if r.not_launched:
        text += f"; not launched by any host call: {', '.join(r.not_launched)}"
    return text


def _module(src: Source, work: Path, archs, head_dims, dtypes, smem_limit) -> Result:
    """Capture, then compile, one module in two child processes; rows rated against the limits."""
    work.mkdir(parents=True)
    result = Result(src)
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    captured = _child(["capture", str(src.path), str(work / "launches.json"), ",".join(map(str, head_dims)),
                       ",".join(dtypes)], dict(env, TRITON_INTERPRET="1"), work / "launches.json")
    t1 = time.time()
    if "failed" in captured:
        result.rows.append(Row(src.name, "-", "-", "-", None, "error", error=captured["failed"]))
        result.seconds = (t1 - t0, 0.0)
        return result
    for e in captured["errors"]:
        result.rows.append(Row(src.name, "-", "-", e["dtype"], e["head_dim"], "error",
                               error=f"host call {e['call']!r}: {e['error']}"))
    launched = {rec["kernel"] for rec in captured["launches"]}
    result.not_launched = [k for k in captured["kernels"] if k not in launched]
    cache = work / "triton-cache"  # empty: every kernel compiles, so ptxas writes its log
    compiled = _child(["compile", str(src.path), str(work / "launches.json"), str(work / "rows.json"),
                       ",".join(archs)],
                      dict(env, TRITON_CACHE_DIR=str(cache), TRITON_DUMP_PTXAS_LOG="1"), work / "rows.json")
    if "failed" in compiled:
        result.rows.append(Row(src.name, "-", "-", "-", None, "error", error=compiled["failed"]))
    order = {k: i for i, k in enumerate(captured["kernels"])}
    raws = sorted(compiled.get("rows", []), key=lambda r: (order[r["kernel"]], archs.index(r["arch"]),
                                                          dtypes.index(r["dtype"]), head_dims.index(r["head_dim"])))
    for raw in raws:
        row = Row(src.name, raw["kernel"], raw["arch"], raw["dtype"], raw["head_dim"], "ok", raw["regs"],
                  raw["spill_bytes"], raw["shared_bytes"], raw["error"], raw["launch"])
        limit = smem_limit or SMEM_LIMIT[row.arch]
        if row.error is not None:
            row.status = "error"
        elif row.shared_bytes > limit:
            row.status = "smem"
        result.rows.append(row)
    result.seconds = (t1 - t0, time.time() - t1)
    return result


def _child(args: list, env: dict, out: Path) -> dict:
    """Run ``python -m attngen.aot ARGS`` and read the JSON it writes to ``out``; {"failed": message} when none."""
    p = subprocess.run([sys.executable, "-m", "attngen.aot", *args], env=env, capture_output=True, text=True)
    if p.returncode == 0 and out.exists():
        return json.loads(out.read_text())
    tail = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if ln.strip()][-4:]
    return {"failed": f"{args[0]} process exited {p.returncode}: " + " | ".join(tail)}


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def table(results: list) -> tuple:
    """(headers, rows) of the table: one line per configuration."""
    headers = ["module", "kernel", "arch", "dtype", "head dim", "status", "registers", "spill bytes",
               "shared bytes", "launch"]
    rows = [(r.module, r.kernel, r.arch, r.dtype, "-" if r.head_dim is None else r.head_dim, r.status,
             _dash(r.regs), _dash(r.spill_bytes), _dash(r.shared_bytes), r.launch)
            for res in results for r in res.rows]
    return headers, rows


def _dash(x):
    return "-" if x is None else x


def summary(results: list, smem_limit: int | None = None) -> str:
    """Counts by status, the configurations that spill, the largest shared memory against its limit."""
    rows = [r for res in results for r in res.rows]
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "smem", "error")}
    text = f"{len(rows)} configurations: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    spills = [r for r in rows if r.spill_bytes]
    text += f"; {len(spills)} with register spills (spill_bytes > 0)"
    sized = [r for r in rows if r.shared_bytes is not None]
    if sized:
        w = max(sized, key=lambda r: r.shared_bytes)
        text += (f"; most shared memory: {w.shared_bytes} B (limit {smem_limit or SMEM_LIMIT[w.arch]}) in "
                 f"{w.module}.{w.kernel} ({w.arch}, {w.dtype}, head dim {w.head_dim}, {w.launch})")
    missing = [f"{res.source.name}.{k}" for res in results for k in res.not_launched]
    if missing:
        text += f"; not launched by any host call (not compiled): {', '.join(missing)}"
    return text


def write_json(results: list, path: Path) -> None:
    rows = [r.as_json() for res in results for r in res.rows]
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# child process 1: the launches the host makes (under the interpreter)
# ---------------------------------------------------------------------------------------------
def _load(path: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("attngen_aot_" + Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kernels(record) -> dict:
    """name -> kernel of every @triton.jit function a module's record (host.Module) holds, in field order."""
    import dataclasses

    from triton.runtime.jit import KernelInterface
    out = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        value = getattr(value, "kernel", value)  # host.Tuned: the kernel it launches (with the host's options)
        if isinstance(value, KernelInterface):
            out[value.fn.__name__] = value
        elif dataclasses.is_dataclass(value):
            out.update(_kernels(value))
    return out


def _desc(x):
    """A launch argument as JSON: what Triton specialises on (a tensor's dtype and 16-byte alignment, values)."""
    import torch
    if isinstance(x, torch.Tensor):
        return ["tensor", str(x.dtype).replace("torch.", ""), x.data_ptr() % 16 == 0]
    if x is None or isinstance(x, (bool, int, float, str)):
        return ["value", x]
    raise TypeError(f"a launch argument of type {type(x).__name__}: expected a tensor, number, string or None")


def capture(path: str, head_dims: list, dtypes: list) -> dict:
    """{"kernels": names, "launches": [...], "errors": [...]} of the module at ``path``: see the module doc."""
    import math

    import torch
    mod = _load(path)
    m = mod.MODULE
    kernels = _kernels(m)
    launches, errors, tag = [], [], {}

    def recorder(name, run):
        def record(*args, grid, warmup, **kwargs):
            launches.append(dict(kernel=name, **tag, args=[_desc(a) for a in args],
                                 kwargs={k: _desc(v) for k, v in kwargs.items()}))
            return run(*args, grid=grid, warmup=warmup, **kwargs)
        return record

    for name, kernel in kernels.items():
        kernel.run = recorder(name, kernel.run)  # __getitem__ calls self.run: the instance attribute wins

    gen = torch.Generator().manual_seed(0)
    attention = getattr(mod, f"{m.spec}_attention")
    step = getattr(mod, f"{m.spec}_step", None)
    sparse = getattr(mod, f"{m.spec}_attention_block_sparse", None)
    both = m.linear is not None and m.quadratic is not None

    def rand(*shape, dtype=torch.float32, grad=True):
        return (0.5 * torch.randn(*shape, generator=gen)).to(dtype).requires_grad_(grad)

    def params(grad=True, b=1, t=LENGTH, dk=None):
        d = tag["head_dim"]
        # [H], [], a table [H, NB], a vector [H, Dk] / [Dk] at the call's head dim dk
        out = {p.name: torch.full(p.sized(HEADS, dk or d),
                                  0.5 if p.default is None else p.default(d) if callable(p.default) else p.default,
                                  requires_grad=grad and not p.fixed) for p in m.params}  # fixed: no gradient
        if m.gate is not None:  # log decays <= 0, [B, H, T] (per key dimension: [B, H, T, Dk])
            shape = (b, HEADS, t) + ((dk_of(d),) if m.gate_dim else ())
            out[m.gate] = torch.nn.functional.logsigmoid(rand(*shape, grad=False)).requires_grad_(grad)
        return out

    def dk_of(d):
        return d if m.linear is None or m.linear.max_power_dim is None else min(d, m.linear.max_power_dim)

    def backward(*outs):
        sum(o.float().sum() for o in outs if o is not None).backward()

    def call(label, fn):
        tag["call"] = label
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is a row of the report
            lines = [ln for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
            errors.append(dict(call=label, dtype=tag["dtype"], head_dim=tag["head_dim"], error=" | ".join(lines[:4])))

    if m.linear is not None and m.linear.chunked is not None:
        mod.host.SCAN = "fused"  # the fused scan here, the chunk-parallel one in the calls marked "parallel"
    for dname in dtypes:
        dtype = getattr(torch, dname)
        for d in head_dims:
            tag.update(dtype=dname, head_dim=d)
            dk = d if m.linear is None or m.linear.max_power_dim is None else min(d, m.linear.max_power_dim)

            def qkv(b=1, t=LENGTH, dk=d, grad=True):
                return rand(b, HEADS, t, dk, dtype=dtype, grad=grad), rand(b, HEADS, t, dk, dtype=dtype, grad=grad), \
                    rand(b, HEADS, t, d, dtype=dtype, grad=grad)

            if m.quadratic is not None:
                order = dict(crossover=math.inf) if both else {}
                call("quadratic", lambda: backward(attention(*qkv(), **order, **params())))
            chunked = m.linear is not None and m.linear.chunked is not None
            if m.linear is not None:
                order = dict(crossover=0.0) if both else {}
                call("linear", lambda: backward(attention(*qkv(dk=dk), **order, **params(dk=dk))))
                if chunked:  # the chunk-parallel scan, which the host picks for long sequences
                    mod.host.SCAN = "parallel"
                    call("parallel", lambda: backward(attention(*qkv(dk=dk), **order, **params(dk=dk))))
                    mod.host.SCAN = "fused"
            if m.stateful:
                width = m.feature_width(dk)

                def state(n):
                    z = rand(n, HEADS, width).detach().abs().add(1.0).requires_grad_() if m.normalised else None
                    return rand(n, HEADS, width, d), z, torch.tensor([3] * n, dtype=torch.int64)

                def stateful(cu, n):
                    o, (s, z, _) = attention(*qkv(dk=dk), initial_state=state(n), return_state=True, cu_seqlens=cu,
                                             **params(dk=dk))
                    backward(o, s, z)

                cu = torch.tensor([0, 40, LENGTH], dtype=torch.int64)
                call("state", lambda: stateful(None, 1))
                call("varlen", lambda: backward(attention(*qkv(dk=dk), cu_seqlens=cu, **params(dk=dk))))
                call("varlen+state", lambda: stateful(cu, 2))
                if chunked:
                    mod.host.SCAN = "parallel"
                    call("parallel+state", lambda: stateful(None, 1))
                    call("parallel+varlen+state", lambda: stateful(cu, 2))
                    mod.host.SCAN = "fused"
                if step is not None:
                    def decode():
                        s, z, _ = state(2)
                        step(*qkv(b=2, t=1, dk=dk, grad=False), s.detach(), None if z is None else z.detach(),
                             torch.tensor([5, 9], dtype=torch.int64), **params(grad=False, b=2, t=1, dk=dk))
                    call("step", decode)
            if sparse is not None:
                for block in (b for b in SPARSE_BLOCKS if b <= m.quadratic.sparse_max_block):
                    # two query and two key blocks: a table width of 2 (a width of 1 would be specialised)
                    table = torch.arange(2).expand(1, HEADS, 2, 2).contiguous()
                    call(f"block_sparse{block}",
                         lambda: backward(sparse(*qkv(t=2 * block), table, block, **params(t=2 * block))))
    return dict(kernels=list(kernels), launches=launches, errors=errors)


# ---------------------------------------------------------------------------------------------
# child process 2: the recorded launches compiled for each arch (no interpreter)
# ---------------------------------------------------------------------------------------------
def _value(d):
    """A stand-in for a recorded argument: a small tensor of its dtype and alignment, or the value."""
    import torch
    if d[0] == "tensor":
        t = torch.empty(64, dtype=getattr(torch, d[1]))
        return t if d[2] else t[1:]
    return d[1]


def _specialise(kernel, rec: dict, arch: str):
    """(target, signature, constexprs, attrs, options) of a recorded launch, as JITFunction.run derives them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", int(arch.removeprefix("sm_")), 32)
    backend = make_backend(target)
    args = [_value(d) for d in rec["args"]]
    kwargs = {k: _value(d) for k, d in rec["kwargs"].items()}
    known = backend.parse_options({}).__dict__  # the launcher's own options, where this Triton has them
    kwargs.setdefault("debug", False)
    for k in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if k in known:
            kwargs.setdefault(k, getattr(triton.knobs.compilation, k))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def _ptxas(log: str) -> tuple:
    """(registers, spill store bytes) from a ``ptxas -v`` log."""
    import re
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    if not regs or not spill:
        raise RuntimeError("no ptxas -v report in the compiler's output (TRITON_DUMP_PTXAS_LOG unsupported?)")
    return int(regs.group(1)), int(spill.group(1))


def _launch_text(kernel, constexprs: dict, options, calls: list) -> str:
    names = {kernel.arg_names[path[0]]: getattr(v, "value", v) for path, v in constexprs.items() if len(path) == 1}
    parts = [n if v is True else f"{n}={v}" for n, v in names.items() if v is not False and n not in ("K", "V")]
    parts.append(f"w{options.num_warps}/s{options.num_stages}"
                 + (f"/maxnreg{options.maxnreg}" if getattr(options, "maxnreg", None) else ""))
    return " ".join(parts) + f" ({','.join(dict.fromkeys(calls))})"


def compile_launches(path: str, captured: dict, archs: list) -> list:
    """One raw row per distinct (kernel, arch, dtype, head dim, specialisation) of the captured launches."""
    import contextlib
    import io

    import triton
    from triton.compiler.compiler import ASTSource
    kernels = _kernels(_load(path).MODULE)
    groups = {}  # (kernel, arch, dtype, head dim, key) -> [specialisation, calls]
    for rec in captured["launches"]:
        for arch in archs:
            kernel = kernels[rec["kernel"]]
            try:
                spec = _specialise(kernel, rec, arch)
                key = repr((sorted(spec[1].items()), sorted(spec[2].items()), sorted(spec[3].items()),
                            sorted(spec[4].__dict__.items())))
            except Exception as e:  # noqa: BLE001 - reported as the configuration's error
                spec, key = e, repr(rec)
            g = groups.setdefault((rec["kernel"], arch, rec["dtype"], rec["head_dim"], key), [spec, []])
            g[1].append(rec["call"])
    done, rows = {}, []  # done: (kernel, arch, key) -> (regs, spill, shared, error); shared across dtype labels
    for (name, arch, dtype, head_dim, key), (spec, calls) in groups.items():
        kernel, launch = kernels[name], ",".join(dict.fromkeys(calls))
        if not isinstance(spec, Exception):
            target, signature, constexprs, attrs, options = spec
            launch = _launch_text(kernel, constexprs, options, calls)
        if (name, arch, key) not in done:
            log = io.StringIO()
            try:
                if isinstance(spec, Exception):
                    raise spec
                with contextlib.redirect_stdout(log):
                    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                              options=options.__dict__)
                done[name, arch, key] = (*_ptxas(log.getvalue()), compiled.metadata.shared, None)
            except Exception as e:  # noqa: BLE001
                lines = [ln for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
                done[name, arch, key] = (None, None, None, " | ".join(lines[:8])[:1500])
        regs, spill, shared, error = done[name, arch, key]
        rows.append(dict(kernel=name, arch=arch, dtype=dtype, head_dim=head_dim, regs=regs, spill_bytes=spill,
                         shared_bytes=shared, error=error, launch=launch))
    return rows


def _main(argv: list) -> None:
    """The child processes: ``capture MODULE OUT DIMS DTYPES`` and ``compile MODULE LAUNCHES OUT ARCHS``."""
    if argv[0] == "capture":
        _, path, out, dims, dtypes = argv
        data = capture(path, [int(x) for x in dims.split(",")], dtypes.split(","))
    else:
        _, path, launches, out, archs = argv
        data = dict(rows=compile_launches(path, json.loads(Path(launches).read_text()), archs.split(",")))
    Path(out).write_text(json.dumps(data))


if __name__ == "__main__":
    _main(sys.argv[1:])

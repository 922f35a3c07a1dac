"""`attngen bench`: time and peak memory of a spec's compiled op against the sequence length T, one series per
ordering (the op compiled with that ordering forced, as ``attngen.compile(spec, plan=...)``) and per peer: the
naive reference (attngen.naive.reference) and PyTorch SDPA (exact softmax attention of the same shape, causal like
the spec: what an attention variant is usually weighed against).

Written beside each other under one stem ``<date>-<device>-bench-<spec>-<mode>``: a Markdown table (``.md``), the
same rows as JSON (``.json``, always: machine, command, date, shapes and one object per series and T), and with
``plot=True`` two PNG plots (``-time.png``, ``-memory.png``: log-log, one line per series; matplotlib, the
``plot`` extra).

Time: the fastest block of torch.utils.benchmark's blocked_autorange, per call (forward pass, torch.no_grad; CUDA
synchronised by the Timer): on a shared, noisy machine interference only adds time. Peak memory: on CUDA
torch.cuda.max_memory_allocated above what was allocated before the call; on a Linux CPU the peak resident set
size of the call (VmHWM of /proc/self/status, reset through /proc/self/clear_refs before it, after malloc_trim)
above the resident size before it. Elsewhere memory is not measured and the rows say so.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.utils.benchmark as torch_benchmark

from attngen import pipeline
from attngen.errors import InputError, PlanError
from attngen.frontend.spec import Spec
from attngen.ir import Ordering
from attngen.naive import reference
from attngen.op import compile as compile_op

PEERS = ("reference", "sdpa")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# the naive reference materialises [B, H, T, T] score, weight and gradient-free intermediates: run it while one
# such tensor in float64 stays below this
REFERENCE_BYTES_LIMIT = 2 ** 30
# whole sequences through the recurrent ordering run one token at a time (the decode ordering): measured only when
# asked for
DEFAULT_SKIPPED = (Ordering.RECURRENT,)


@dataclass
class Row:
    """One measurement: ``series`` (an ordering name, or a peer: reference, sdpa) at length ``T``."""
    series: str
    kind: str  # "ordering" or "peer"
    T: int
    ms: float | None  # forward time in milliseconds (the fastest block, per call); None: not measured (see note)
    peak_mib: float | None  # peak memory of the call above what was held before it, MiB; None: not measured
    note: str = ""


@dataclass
class Result:
    spec: str
    mode: str
    backend: str
    device: str
    machine: str
    command: str
    date: str
    dtype: str
    batch: int
    heads: int
    head_dim: int
    memory: str  # how memory was measured
    rows: list = field(default_factory=list)

    @property
    def series(self) -> list:
        """The series names in the order they were measured."""
        return list(dict.fromkeys(r.series for r in self.rows))

    @property
    def lengths(self) -> list:
        return sorted({r.T for r in self.rows})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Result":
        data = json.loads(text)
        return cls(**{**data, "rows": [Row(**r) for r in data["rows"]]})


def orderings(spec: Spec, backend: str = "torch", head_dim: int = 64) -> list:
    """The orderings ``spec`` can be forced to on ``backend`` (the planner's legal candidates; for triton those its
    kernels run), without the recurrent one (DEFAULT_SKIPPED). A spec with terms: ["auto"] (each term planned on its
    own)."""
    if spec.terms:
        return ["auto"]
    plan = pipeline.plan(spec, target=backend, head_dim=head_dim)
    legal = [c.ordering for c in plan.candidates if c.legal and c.ordering not in DEFAULT_SKIPPED]
    if backend == "triton":
        legal = [o for o in legal if o in plan.capabilities.kernels]
    return [o.value for o in legal]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine(device: torch.device) -> str:
    """The CPU model, core count, load average (other work on a shared machine slows every series), torch and
    Python versions; the GPU's name on CUDA."""
    cpu = cpu_name()
    gpu = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    load = f", load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    return (f"{gpu}{cpu}, {os.cpu_count()} cores{load}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def device_label(device: torch.device) -> str:
    """A short file-name-safe name of the device: "cpu", or the GPU's name in lower case with dashes."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).lower().replace(" ", "-")


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def memory_method(device: torch.device) -> str | None:
    """How peak memory is measured on ``device``, or None when it cannot be (a CPU without Linux's /proc)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the memory allocated before the call"
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status("VmHWM")
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return ("peak resident set size of the call (VmHWM, reset before it after malloc_trim) above the resident size "
            "before it")


def peak_memory(fn, device: torch.device) -> float:
    """Bytes ``fn()`` holds at its peak above what was held before it (memory_method)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what earlier calls freed, so it is not reused unseen
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _proc_status("VmRSS")
    fn()
    return float(_proc_status("VmHWM") - before)


def _inputs(spec: Spec, b, h, t, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(dtype=dtype, device=device) for _ in range(3))
    gates = {}
    for gate in spec.gates:  # log gates around log(0.9), as attngen.verify draws them
        shape = (b, h, t) + ((d,) if gate.per == "key_dim" else ())
        gates[gate.name] = torch.nn.functional.logsigmoid(2.2 + torch.randn(shape, generator=g)).to(device=device)
    return q, k, v, gates


def _callable(name: str, spec: Spec, backend: str):
    """(q, k, v, gates) -> output of one series."""
    if name == "reference":
        ref = reference(spec)
        return lambda q, k, v, g: ref(q, k, v, **g)
    if name == "sdpa":
        return lambda q, k, v, g: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=spec.causal)
    op = compile_op(spec, backend=backend, plan=None if name == "auto" else name)
    return lambda q, k, v, g: op(q, k, v, **g)


def run(spec: Spec, lengths, *, backend: str = "torch", series=None, peers=PEERS, batch: int = 1, heads: int = 4,
        head_dim: int = 64, dtype: str = "float32", device=None, min_time: float = 0.2, command: str = "",
        echo=None) -> Result:
    """Measure ``spec`` at each length of ``lengths``: each ordering of ``series`` (default: orderings(spec)) and
    each peer of ``peers``. ``echo(line)`` gets one progress line per measurement."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if backend == "triton" and device.type != "cuda":
        raise InputError("--backend triton measures the generated kernels on a CUDA GPU; this machine has none "
                         "(under the Triton interpreter the times would be meaningless): use --backend torch")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise InputError(f"peers {unknown}: expected some of {', '.join(PEERS)}")
    if not lengths or min(lengths) < 1:
        raise InputError(f"lengths {list(lengths)}: expected positive integers")
    legal = orderings(spec, backend, head_dim)
    chosen = list(series) if series else legal
    if spec.terms and any(name != "auto" for name in chosen):
        raise PlanError(f"{spec.name} has terms, each planned on its own: bench it without --plan")
    for name in chosen:  # PlanError now for an ordering the spec does not have, not after the others ran
        if name != "auto" and not spec.terms:
            pipeline.plan(spec, target=backend, head_dim=head_dim, force=name)
    method = memory_method(device)
    result = Result(spec.name, spec.mode, backend, device_label(device), machine(device), command,
                    datetime.date.today().isoformat(), dtype, batch, heads, head_dim,
                    method or "not measured (needs CUDA, or Linux's /proc/self/clear_refs and glibc on a CPU)")
    fns = [(name, "ordering", _callable(name, spec, backend)) for name in chosen]
    fns += [(name, "peer", _callable(name, spec, backend)) for name in peers]
    for t in sorted(lengths):
        q, k, v, gates = _inputs(spec, batch, heads, t, head_dim, DTYPES[dtype], device)
        for name, kind, fn in fns:
            row = _measure(name, kind, fn, (q, k, v, gates), t, device, method, min_time,
                           skip=_skip(name, batch, heads, t))
            result.rows.append(row)
            if echo:
                got = (f"{row.ms:.3g} ms" + (f", {row.peak_mib:.3g} MiB" if row.peak_mib is not None else "")
                       if row.ms is not None else row.note)
                echo(f"{spec.name} ({spec.mode}) {name} T={t}: {got}")
    if all(r.ms is None for r in result.rows):
        raise PlanError(f"{spec.name}: no measurement succeeded; the first: {result.rows[0].note}")
    return result


def _skip(name, b, h, t) -> str:
    need = b * h * t * t * 8
    if name == "reference" and need > REFERENCE_BYTES_LIMIT:
        return (f"skipped: the naive reference materialises B x H x T x T ({need / 2 ** 30:.1f} GiB in float64 "
                f"over {REFERENCE_BYTES_LIMIT / 2 ** 30:.0f} GiB)")
    return ""


def _measure(name, kind, fn, args, t, device, method, min_time, skip) -> Row:
    if skip:
        return Row(name, kind, t, None, None, skip)
    try:
        with torch.no_grad():
            fn(*args)  # warm-up: compiled plans, caches, lazy imports
            timer = torch_benchmark.Timer("fn(*args)", globals={"fn": fn, "args": args})
            ms = min(timer.blocked_autorange(min_run_time=min_time).times) * 1e3  # noise only adds time
            mib = peak_memory(lambda: fn(*args), device) / 2 ** 20 if method else None
    except (RuntimeError, PlanError, InputError, MemoryError) as exc:  # e.g. out of memory: a row that says so
        return Row(name, kind, t, None, None, f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return Row(name, kind, t, ms, mib)


# ---------------------------------------------------------------------------------------------
# output: Markdown, JSON, PNG
# ---------------------------------------------------------------------------------------------
def stem(result: Result) -> str:
    return f"{result.date}-{result.device}-bench-{result.spec}-{result.mode}"


def markdown(result: Result) -> str:
    """The result as a Markdown report: a header naming machine, command and date, then one table of time and one
    of peak memory (rows T, a column per series)."""
    names = result.series
    rows = {(r.series, r.T): r for r in result.rows}
    lines = [f"# {result.spec} ({result.mode}): time and peak memory against T ({result.backend} backend, "
             f"{result.device})", "",
             f"- date: {result.date}", f"- machine: {result.machine}", f"- command: `{result.command}`",
             f"- shapes: B{result.batch} H{result.heads} D{result.head_dim}, {result.dtype}, forward only "
             "(torch.no_grad); time: the fastest block of torch.utils.benchmark's blocked_autorange, per call",
             f"- memory: {result.memory}",
             "- series: " + ", ".join(f"{n} ({rows[(n, result.lengths[0])].kind})" for n in names), ""]
    for title, key, unit in (("Time", "ms", "ms"), ("Peak memory", "peak_mib", "MiB")):
        lines += [f"## {title} ({unit})", "", "| T | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for t in result.lengths:
            lines.append(f"| {t} | " + " | ".join(_cell(rows.get((n, t)), key) for n in names) + " |")
        lines.append("")
    notes = [f"- {r.series} at T={r.T}: {r.note}" for r in result.rows if r.note]
    if notes:
        lines += ["## Not measured", "", *notes, ""]
    return "\n".join(lines)


def _cell(row, key) -> str:
    if row is None or getattr(row, key) is None:
        return "-"
    return f"{getattr(row, key):.4g}"


def check_plotting() -> None:
    """InputError naming the extra when matplotlib is missing (before anything is measured)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed: pip install 'attngen[plot]' "
                         "(or run without --plot: the Markdown and JSON are written anyway)") from None


def plot(result: Result, folder: Path, name: str | None = None) -> list:
    """Two PNGs beside the Markdown, ``<name>-time.png`` and ``<name>-memory.png`` (``name`` defaults to
    stem(result)): time and peak memory against T, log-log, one line per series (orderings solid, peers dashed),
    titled with the spec, device and date. Returns their paths."""
    check_plotting()
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

    paths = []
    panels = (("ms", "forward time (ms)", "time"), ("peak_mib", "peak memory of the call (MiB)", "memory"))
    for key, label, suffix in panels:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        drawn = 0
        for series in result.series:
            # a log axis has no place for 0 (a call that grew the resident set by less than a page)
            pts = [(r.T, getattr(r, key)) for r in result.rows
                   if r.series == series and getattr(r, key) is not None and getattr(r, key) > 0]
            if not pts:
                continue
            kind = next(r.kind for r in result.rows if r.series == series)
            ax.plot(*zip(*pts), marker="o", linestyle="-" if kind == "ordering" else "--",
                    label=series if kind == "ordering" else f"{series} (peer)")
            drawn += 1
        ax.set_xscale("log", base=2)
        ax.set_xticks(result.lengths, labels=[str(t) for t in result.lengths])  # the measured T, as numbers
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"not measured: {result.memory}", ha="center", va="center", transform=ax.transAxes,
                    wrap=True)
        ax.set_title(f"{result.spec} ({result.mode}), {result.backend} backend on {result.device}, {result.date}\n"
                     f"B{result.batch} H{result.heads} D{result.head_dim} {result.dtype}", fontsize=10)
        path = Path(folder) / f"{name or stem(result)}-{suffix}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def write(result: Result, folder: Path, with_plot: bool = False) -> list:
    """Write the Markdown and JSON (and with ``with_plot`` the PNGs) into ``folder``; returns the paths."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: expected a folder for the results, found a file")
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / f"{stem(result)}.md", folder / f"{stem(result)}.json"
    md.write_text(markdown(result))
    js.write_text(result.to_json())
    return [md, js] + (plot(result, folder) if with_plot else [])

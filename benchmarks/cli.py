"""The benchmarks command line, ``python -m benchmarks <benchmark> [options]`` from the repository root.

One subcommand per benchmark; each writes one markdown table to ``--out`` (default bench/results/,
``<date>-cpu-<name>.md``) and prints it. Exit codes: 0 success, 1 every measurement of a benchmark failed (no
file is written), 2 bad input (an unknown spec, a spec the benchmark cannot run, a bad option; one message,
``--debug`` shows the traceback).
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

import attngen
from attngen import pipeline
from attngen.errors import AttngenError
from attngen.runtime.state import check_decodable
from benchmarks import cpu, gpu
from benchmarks.common import WorkerError, decode, linear_scaling, write_result
from benchmarks.conv_basis import conv_basis_error, conv_basis_scaling
from benchmarks.cp import cp_traffic
from benchmarks.minilm_swap import minilm_swap
from benchmarks.sparse import sparse
from benchmarks.toeplitz import toeplitz
from benchmarks.window import window_scaling

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
PROG = "python -m benchmarks"


class _Group(click.Group):
    """A user's mistake (AttngenError) is one message and exit 2; a benchmark whose every measurement failed
    (WorkerError) one message and exit 1; unless --debug."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (AttngenError, WorkerError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"benchmarks: error: {exc}", err=True)
            sys.exit(1 if isinstance(exc, WorkerError) else 2)


_max_len = click.option("--max-len", type=click.IntRange(1024), default=32768, show_default=True,
                        help="The longest sequence length T measured.")
_out = click.option("--out", type=click.Path(file_okay=False), default="bench/results", show_default=True,
                    help="Folder for the result table (<date>-cpu-<name>.md).")
_spec = click.option("--spec", "spec_name", default="linear_elu", show_default=True,
                     help="A built-in spec name or a YAML file (causal).")


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def main(ctx, debug):
    """attngen's benchmarks: each measures the torch backend on this machine against exact anchors run in
    the same process tree (PyTorch SDPA, the naive reference) and writes a markdown table to --out."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command(context_settings=CONTEXT)
@_max_len
@_out
@_spec
@click.option("--plot", is_flag=True, help="Also write -time.png and -memory.png beside the table (matplotlib: "
                                         "pip install 'attngen[plot]').")
def linear(max_len, out, spec_name, plot):
    """Causal linear plan vs reference and SDPA.

    Time and peak memory of the torch backend's causal linear plan against the naive reference and PyTorch
    SDPA, T = 1k .. --max-len, each case in its own subprocess. Writes the table, the same rows as JSON (the
    format of `attngen bench`) and with --plot the PNGs of `attngen bench --plot`."""
    pipeline.plan(attngen.load_spec(spec_name, causal=True), force="linear")  # PlanError: no linear ordering
    linear_scaling(spec_name=spec_name, max_len=max_len, out_dir=Path(out), plot=plot)


@main.command("gpu", context_settings=CONTEXT)
@click.option("--spec", "specs", multiple=True, type=click.Choice(gpu.SPECS),
              help="Specs to run (repeatable) [default: all of them].")
@click.option("--repeats", type=click.IntRange(3), default=20, show_default=True, help="Timed runs per case.")
@click.option("--quick", is_flag=True, help="Only the first and the last shape (a short smoke run).")
@_out
def gpu_cmd(specs, repeats, quick, out):
    """Triton kernels vs fla-core and SDPA on a GPU.

    Generated Triton kernels vs fla-core and SDPA on a CUDA GPU (bf16, fwd and fwd+bwd, fla's shapes).

    Writes <date>-<gpu>-gpu.md with the medians, the ratios attngen / peer and the memory floor of each
    row. Needs a CUDA GPU; fla-core is optional (missing peers are rows that say so; scripts/gpu_wheels.sh
    downloads its wheels for an offline machine)."""
    import datetime
    import shlex

    import torch
    shapes = (gpu.SHAPES[0], gpu.SHAPES[-1]) if quick else gpu.SHAPES
    rows, bw, machine = gpu.run(specs or gpu.SPECS, shapes, repeats, echo=click.echo)
    if not any(r.ours_ms for r in rows):
        raise WorkerError("no attngen measurement succeeded (see the notes of the rows above)")
    command = "python -m benchmarks gpu " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    date = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    write_result(gpu.report(rows, bw, machine, command, date), Path(out), f"{name}-gpu", echo=click.echo)


@main.command("cpu", context_settings=CONTEXT)
@click.option("--max-len", type=click.IntRange(64), default=32768, show_default=True,
              help="The longest T of the forward rows (4k, 16k, 32k up to it) and decode contexts (1k, 16k).")
@_out
@click.option("--threads", default="1,2", show_default=True, help="Comma-separated thread counts.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed runs per case.")
@click.option("--tokens", type=click.IntRange(1), default=200, show_default=True,
              help="Decode steps timed per case.")
def cpu_cmd(max_len, out, threads, repeats, tokens):
    """The torch backend vs its CPU peers.

    Causal linear attention against a 20-line chunked loop and fla-core's naive functions (fwd, fwd+bwd, share
    of the matmul rate), retention against naive_chunk_simple_gla, softmax against SDPA, op.step against
    hand-written recurrent steps after contexts of 1k and 16k; at each --threads count. Writes
    <date>-cpu-torch-backend.md and .json."""
    import datetime
    import shlex

    from benchmarks.common import _machine
    try:
        counts = tuple(int(x) for x in threads.split(",") if x.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{threads!r}: expected positive integers separated by commas", param_hint="--threads")
    results = cpu.run(max_len, counts, repeats, tokens, echo=click.echo)
    command = "python -m benchmarks cpu " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    date = datetime.date.today().isoformat()
    path = write_result(cpu.report(results, _machine(), command, date), Path(out), "cpu-torch-backend",
                        echo=click.echo)
    path.with_suffix(".json").write_text(cpu.to_json(results | {"machine": _machine(), "command": command,
                                                                "date": date}))


@main.command("decode", context_settings=CONTEXT)
@_max_len
@_out
@_spec
@click.option("--tokens", type=click.IntRange(1), default=64, show_default=True, help="Tokens decoded per case.")
def decode_cmd(max_len, out, spec_name, tokens):
    """Recurrent decode step vs a softmax KV cache.

    Decode --tokens tokens after a context of T = 1k .. --max-len: the recurrent step (op.step) against a
    softmax KV cache (SDPA), with the exact bytes of the state and of the cache. --spec needs a recurrent
    state (causal and separable)."""
    check_decodable(pipeline.plan(attngen.load_spec(spec_name, causal=True)), f"{PROG} decode --spec {spec_name}")
    decode(spec_name=spec_name, max_len=max_len, tokens=tokens, out_dir=Path(out))


@main.command("sparse", context_settings=CONTEXT)
@_max_len
@_out
def sparse_cmd(max_len, out):
    """topk_sparse: recall, error, time and memory.

    SEA-style topk_sparse (docs/sparse.md): recall of the true top-k blocks, error against exact softmax and
    time per estimator x k (random and all-MiniLM-L6-v2 q, k, v), forward memory against T = 1k .. --max-len
    next to exact softmax."""
    sparse(max_len=max_len, out_dir=Path(out))


@main.command("minilm-swap", context_settings=CONTEXT)
@_out
def minilm_swap_cmd(out):
    """MiniLM embeddings, variants swapped in.

    all-MiniLM-L6-v2 with attngen's attention, the embedding cosine per layer swapped.

    transformers' BertModel from the weights package (attngen.hf, docs/hf.md): attngen's softmax in every layer,
    then cosformer, topk_sparse and conv_basis in one layer at a time; the cosine between each text's sentence
    embedding and the unmodified model's (needs the weights: bash scripts/setup_bench.sh)."""
    minilm_swap(out_dir=Path(out))


@main.command("conv-basis", context_settings=CONTEXT)
@_max_len
@_out
@click.option("--conv-k", type=click.IntRange(1), default=8, show_default=True, help="Basis size k.")
def conv_basis_cmd(max_len, out, conv_k):
    """conv_basis time vs exact SDPA against T.

    Causal softmax through conv_basis (docs/conv_basis.md, --conv-k elements) against exact SDPA,
    T = 1k .. --max-len, each case in its own subprocess."""
    conv_basis_scaling(max_len=max_len, k=conv_k, out_dir=Path(out))


@main.command("conv-basis-error", context_settings=CONTEXT)
@_out
def conv_basis_error_cmd(out):
    """conv_basis output error against k.

    conv_basis output error and time against k = 1 .. 32 on random, exactly k-conv and all-MiniLM-L6-v2
    q, k, v (T = 512)."""
    conv_basis_error(out_dir=Path(out))


@main.command("toeplitz", context_settings=CONTEXT)
@_max_len
@_out
def toeplitz_cmd(max_len, out):
    """Toeplitz reweighting: FFT vs quadratic.

    A Toeplitz reweighting: the FFT ordering against the quadratic one, T = 256 .. --max-len, beside the
    cost model's crossover."""
    toeplitz(max_len=max_len, out_dir=Path(out))


@main.command("window", context_settings=CONTEXT)
@click.option("--min-len", type=click.IntRange(256), default=4096, show_default=True, help="The shortest T measured.")
@_max_len
@_out
@click.option("--window", type=click.IntRange(1), default=256, show_default=True, help="The spec's window.")
@click.option("--heads", type=click.IntRange(1), default=4, show_default=True, help="Heads H (B = 1, D = 64).")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Timed rounds over the lengths.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads (default: torch's).")
@click.option("--memory", is_flag=True, help="Also count what one forward + backward allocates (tensors, bytes, "
              "bytes in tensors of 1 MiB and more): unaffected by a busy machine.")
def window_cmd(min_len, max_len, out, window, heads, repeats, threads, memory):
    """Sliding window attention: time against T.

    A causal softmax spec with `window: N` on the torch backend: forward and forward + backward times,
    T = --min-len .. --max-len (doubling), and the ratio of the longest to the shortest (linear in T)."""
    command = (f"python -m benchmarks window --min-len {min_len} --max-len {max_len} --window {window} "
               f"--heads {heads} --repeats {repeats}" + (f" --threads {threads}" if threads else "")
               + (" --memory" if memory else ""))
    window_scaling(out_dir=Path(out), window=window, h=heads, min_len=min_len, max_len=max_len, repeats=repeats,
                   threads=threads, command=command, echo=click.echo, memory=memory)


@main.command("cp", context_settings=CONTEXT)
@click.option("--world", type=click.IntRange(2, 16), default=4, show_default=True, help="gloo ranks spawned.")
@click.option("--min-len", type=click.IntRange(64), default=8192, show_default=True, help="The shortest total T.")
@click.option("--max-len", type=click.IntRange(64), default=131072, show_default=True, help="The longest total T.")
@click.option("--heads", type=click.IntRange(1), default=4, show_default=True, help="Heads H (B = 1).")
@click.option("--head-dim", type=click.IntRange(1), default=32, show_default=True, help="Head dim D.")
@click.option("--repeats", type=click.IntRange(1), default=1, show_default=True, help="Timed runs per case.")
@_out
def cp_cmd(world, min_len, max_len, heads, head_dim, repeats, out):
    """Context parallelism: bytes per rank.

    Bytes per rank per layer against T.

    cp_attention (attngen.distributed) on --world gloo ranks of this CPU, forward and backward, T = --min-len ..
    --max-len total (doubling): the bytes each rank hands to each collective, which should not change with T,
    and a cost model's table of the all-gather of states next to ring attention for 8 .. 64 ranks."""
    if min_len % world or max_len < min_len:
        raise click.BadParameter(f"--min-len {min_len}, --max-len {max_len}: expected min <= max and lengths that "
                                 f"{world} ranks divide", param_hint="--min-len")
    command = (f"python -m benchmarks cp --world {world} --min-len {min_len} --max-len {max_len} --heads {heads} "
               f"--head-dim {head_dim} --repeats {repeats}")
    cp_traffic(out_dir=Path(out), world=world, min_len=min_len, max_len=max_len, h=heads, d=head_dim,
               repeats=repeats, command=command, echo=click.echo)


if __name__ == "__main__":
    main(prog_name=PROG)

"""The attngen command line (also ``python -m attngen``): list, plan, verify, build, aot, bench.

Every command has a summary of at most 45 characters (``attngen --help`` lists them whole) and every option a help
text (tests/test_cli.py walks the command tree). Exit codes: 0 success, 1 a verification failed (aot: a kernel over
shared memory or failing to compile), 2 bad input (one clear message; --debug shows the traceback).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import yaml

from attngen.errors import AttngenError, InputError, PlanError, VerificationError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns a user's mistake (AttngenError) into one message and exit 2, unless --debug."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VerificationError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"attngen: verification failed: {exc}", err=True)
            sys.exit(1)
        except (AttngenError, yaml.YAMLError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"attngen: error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:  # a file the user named (--dot, --out, a cache folder) cannot be read or written
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"attngen: error: {where}{exc.strerror or exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="attngen")
@click.pass_context
def main(ctx, debug):
    """attngen: compile attention-variant specs into verified kernels.

    SPEC is a YAML file or a built-in name (see `attngen list`). `python -m attngen` runs the same command."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _overrides(pairs) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE, e.g. M=4096", param_hint="--set")
        key, value = pair.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out[key.strip()] = parsed if isinstance(parsed, (int, float, bool)) else value
    return out


def _modes(mode: str) -> list:
    return {"both": [True, False], "causal": [True], "bidirectional": [False]}[mode]


def _int_list(text: str, name: str) -> list:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers, e.g. 1,63,200",
                                 param_hint=name) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: expected positive integers", param_hint=name)
    return values


def _checked_lengths(text: str) -> list:
    from attngen.verify import MAX_LENGTH
    values = _int_list(text, "--seq-len")
    if max(values) > MAX_LENGTH:
        raise click.BadParameter(f"{max(values)}: at most {MAX_LENGTH} (the naive reference materialises T x T in "
                                 f"float64: 128 MiB per batch and head at {MAX_LENGTH})", param_hint="--seq-len")
    return values


@main.command("list", context_settings=CONTEXT)
def list_cmd():
    """List the built-in specs and their plans.

    Each built-in spec with its similarity and reweighting classes, the planner's choice (causal, head dim 64) and
    its description."""
    from attngen import pipeline
    from attngen.frontend.spec import builtin_names, load_spec
    rows = []
    for name in builtin_names():
        spec = load_spec(name)
        if spec.terms:  # each term planned on its own
            plans = [pipeline.plan(t.spec) for t in spec.terms]
            rows.append((name, f"{len(plans)} terms: " + ", ".join(p.similarity.kind.value for p in plans),
                         ", ".join(p.reweight.kind.value for p in plans),
                         "; ".join(p.choice.describe() for p in plans), spec.description[:60]))
            continue
        plan = pipeline.plan(spec)
        rows.append((name, plan.similarity.kind.value, plan.reweight.kind.value, plan.choice.describe(),
                     spec.description[:60]))
    _table(["spec", "similarity", "reweight", "plan (causal, d=64)", "description"], rows)


@main.command(context_settings=CONTEXT)
@click.argument("spec")
@click.option("--seq-len", "-n", type=click.IntRange(1), default=4096, show_default=True,
              help="Length for the cost table.")
@click.option("--head-dim", "-d", type=click.IntRange(1, 1024), default=64, show_default=True,
              help="Head dim for the costs and the plan.")
@click.option("--mode", type=click.Choice(["causal", "bidirectional"]), default=None,
              help="Override the spec's mode.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a constant, e.g. M=4096.")
@click.option("--plan", "force", default=None, help="Force an ordering (linear, quadratic, recurrent, fft).")
@click.option("--target", type=click.Choice(["torch", "triton"]), default="torch", show_default=True,
              help="Plan for this backend (triton: among the orderings its kernels run).")
@click.option("--trace", is_flag=True, help="Also list every pass of the pipeline (frontend, planning, lowering).")
@click.option("--dot", "dot_file", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the op graph in Graphviz DOT to this file (needs pydot: attngen[dot]).")
def plan(spec, seq_len, head_dim, mode, sets, force, target, trace, dot_file):
    """Show how the planner orders SPEC.

    How the planner rewrote SPEC (a YAML file or built-in name), the cost table of its orderings, and the chosen
    ordering."""
    from attngen import pipeline
    from attngen.frontend.spec import load_spec
    from attngen.graph import to_dot
    overrides = _overrides(sets)
    if mode:
        overrides["causal"] = mode == "causal"
    loaded = load_spec(spec, **overrides)
    if loaded.terms:  # each term planned on its own, read out together
        from attngen.op import TermsPlan
        plans = tuple(pipeline.plan(t.spec, target=target, head_dim=head_dim, force=force) for t in loaded.terms)
        click.echo(TermsPlan(loaded, plans, head_dim).explain(n=seq_len, head_dim=head_dim))
        if trace or dot_file:
            raise click.UsageError(f"--trace and --dot show one plan; {loaded.name} has terms: plan a term's spec")
        return
    p = pipeline.plan(loaded, target=target, head_dim=head_dim, force=force)
    click.echo(p.explain(n=seq_len, head_dim=head_dim))
    if trace:
        click.echo("\npipeline trace:")
        _table(["stage", "pass", "what it did"], pipeline.trace(p))
    if dot_file:
        text = to_dot(p)
        try:
            Path(dot_file).write_text(text)
        except OSError as exc:
            raise InputError(f"--dot {dot_file}: cannot write the op graph there ({exc.strerror or exc})") from None
        click.echo(f"\nop graph written to {dot_file}")


def _verify_options(f):
    options = [
        click.option("--all", "all_specs", is_flag=True, help="All built-in specs."),
        click.option("--mode", type=click.Choice(["both", "causal", "bidirectional"]), default="both",
                     show_default=True, help="Which modes of each spec (a gated spec is causal only)."),
        click.option("--backend", type=click.Choice(["torch", "triton", "auto"]), default=None,
                     help="verify: torch (default), triton or auto; build: both torch and triton (default), "
                          "or one of them."),
        click.option("--plan", "force", default=None,
                     help="Force an ordering (linear, quadratic, recurrent, fft) [default: the planner's choice]; "
                          "build: the modules then hold only its kernels, and --out must be given."),
        click.option("--dtype", "dtypes", multiple=True,
                     type=click.Choice(["float64", "float32", "float16", "bfloat16"]),
                     help="Input dtypes (repeatable) [default: float64, float32 on torch; float32, float16 on "
                          "triton]; bfloat16 on triton needs a GPU."),
        click.option("--seq-len", "lengths", default="7,63,200", show_default=True,
                     help="Comma-separated sequence lengths."),
        click.option("--head-dim", type=click.IntRange(1, 1024), default=16, show_default=True,
                     help="Head dim of the inputs."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a constant."),
    ]
    for option in reversed(options):
        f = option(f)
    return click.argument("specs", nargs=-1)(f)


def _specs(names, all_specs, mode, sets) -> list:
    from attngen.frontend.spec import builtin_names, load_spec, spec_modes
    names = list(names) + (builtin_names() if all_specs else [])
    if not names:
        raise click.UsageError("name at least one SPEC (a YAML file or built-in name), or pass --all")
    out = []
    for n in names:
        for c in _modes(mode):
            if not c and len(_modes(mode)) > 1 and spec_modes(n) == (True,):
                click.echo(f"{n}: causal only (a gate decays the past), bidirectional mode skipped", err=True)
                continue
            out.append(load_spec(n, causal=c, **_overrides(sets)))
    return out


def _verify(cases) -> list:
    """Run the cases (attngen.verify.Case), one progress line per spec and mode as its last case finishes; print the
    table; raise VerificationError on a failure and a usage error when there is nothing to verify."""
    import torch

    from attngen.verify import run_case
    if not cases:
        raise click.UsageError("nothing to verify: no case matches the specs, backend and options given")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and any(c.dtype == "bfloat16" and c.backend != "torch" for c in cases):
        raise click.UsageError("--dtype bfloat16 on the triton backend needs a CUDA GPU: Triton's interpreter "
                               "computes bf16 tl.dot wrongly on a CPU; verify bfloat16 there with --backend torch")
    groups = _groups(cases)
    results, done = [], 0
    for n, group in enumerate(groups, 1):
        start = time.perf_counter()
        mine = []
        for case in group:
            mine.append(run_case(case, device=device))
        results += mine
        done += len(group)
        failed = [c.id for c, r in zip(group, mine) if not r.passed]
        verdict = (f"pass ({len(group)} cases)" if not failed else
                   f"FAIL: {len(failed)} of {len(group)} cases ({', '.join(failed)})")
        # one line per spec, to stderr (click.echo flushes it): progress that reads the same in a terminal and in
        # a CI log
        click.echo(f"[{n}/{len(groups)} specs, {done}/{len(cases)} cases] {group[0].spec.name} "
                   f"({group[0].spec.mode}): {verdict} in {time.perf_counter() - start:.1f} s", err=True)
    rows = []
    for r in results:
        grads = [k for k in r.errors if k != "o"]
        rows.append((r.spec, r.mode, r.ordering, r.backend, r.dtype, r.shape, f"{r.errors['o']:.1e}",
                     " ".join(f"{k}={r.errors[k]:.1e}" for k in grads), f"{r.tolerance:.0e}",
                     "pass" if r.passed else "FAIL"))
    _table(["spec", "mode", "plan", "backend", "dtype", "shape", "err o", "err grads", "tol", ""], rows)
    approx = [r for r in results if r.exact_error is not None]
    if approx:
        click.echo("\napproximations: verified against the reference of what they compute given their decisions "
                   "(docs/api.md); their output's error against the exact reference (not a pass criterion):")
        for r in approx:
            click.echo(f"  {r.spec} {r.mode} {r.backend} {r.dtype} {r.shape}: {r.exact_error:.2e}")
    failed = [r for r in results if not r.passed]
    click.echo(f"\n{len(results) - len(failed)} passed, {len(failed)} failed\n(errors: RMS(out - ref) / "
               "max(RMS(ref), 1e-2) against the float64 reference; a quantity passes within max(tol, 2 x the "
               "same-dtype reference's error), or within 8 units of roundoff absolute; plan 'step': a prefill, "
               "then op.step token by token)")
    if failed:
        raise VerificationError(", ".join(sorted({f"{r.spec} ({r.mode}, {r.backend})" for r in failed})))
    return results


def _groups(cases) -> list:
    """The cases in runs of the same spec (the same loaded Spec object: one spec in one mode)."""
    out = []
    for case in cases:
        if out and out[-1][0].spec is case.spec:
            out[-1].append(case)
        else:
            out.append([case])
    return out


def _use_interpreter_without_gpu():
    """On a machine without CUDA the Triton kernels run under the interpreter. It must precede importing triton, which
    importing attngen.op does (torch._dynamo imports it): call this before importing attngen.op or attngen.verify."""
    import os

    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@main.command(context_settings=CONTEXT)
@_verify_options
def verify(specs, all_specs, mode, backend, force, dtypes, lengths, head_dim, sets):
    """Verify compiled ops against the reference.

    Check the compiled op of each of SPECS (YAML files or built-in names, or --all) against the naive reference: the
    output and every gradient, and the decode step of decodable specs. One progress line per spec and mode on
    stderr, then the table of every case."""
    backend = backend or "torch"
    if backend != "torch":
        _use_interpreter_without_gpu()  # before attngen.verify: importing torch._dynamo (attngen.op) imports triton
    from attngen.verify import verify_cases
    _verify(verify_cases(_specs(specs, all_specs, mode, sets), backend, force, dtypes,
                         _checked_lengths(lengths), head_dim))


@main.command(context_settings=CONTEXT)
@_verify_options
@click.option("--out", type=click.Path(file_okay=False), default="generated", show_default=True,
              help="Folder for the generated modules (<name>_<mode>.py).")
@click.option("--standalone", is_flag=True,
              help="Also write the modules' shared host runtime to --out/attngen_host, so that they run without "
                   "attngen installed (put --out on sys.path).")
@click.pass_context
def build(ctx, specs, all_specs, mode, backend, force, dtypes, lengths, head_dim, sets, out, standalone):
    """Write and verify SPECs' Triton modules.

    Generate the Triton module of each of SPECS (where its plan has templates), write it to --out, and verify it
    (natively on a GPU, under the Triton interpreter on a CPU) and the torch backend against the naive reference.
    With
    --plan ORDERING the modules hold only that ordering's kernels (what attngen.compile(spec, backend="triton",
    plan=ORDERING) runs) and every case runs it; --out must then name a folder (generated/ holds the planner's
    modules)."""
    _use_interpreter_without_gpu()  # before attngen.verify: importing torch._dynamo (attngen.op) imports triton
    from attngen import pipeline
    from attngen.build import HOST_PACKAGE, generate, write, write_host
    from attngen.verify import build_cases
    if force is not None and ctx.get_parameter_source("out") == click.core.ParameterSource.DEFAULT:
        raise click.UsageError(f"--plan {force} writes modules that hold only the {force} ordering's kernels: give "
                               "--out DIR for them (the default, generated/, holds the planner's modules, which a "
                               "test checks byte for byte)")
    lens = _checked_lengths(lengths)
    loaded = _specs(specs, all_specs, mode, sets)
    if force is not None:  # an ordering a spec does not have: one PlanError before anything is written
        for spec in loaded:
            for s in [t.spec for t in spec.terms] or [spec]:
                pipeline.plan(s, force=force)
    forced = f" (plan {force} forced: only its kernels)" if force is not None else ""
    modules, refused = [], []
    for spec in loaded:
        module = generate(spec, force)
        modules.append(module)
        if module.parts:  # a spec with terms: one module per term, combined by the op
            for part in module.parts:
                if part.source is None:
                    click.echo(f"{spec.name} ({spec.mode}): term {part.spec.name}: no Triton module: {part.reason}")
                else:
                    click.echo(f"{spec.name} ({spec.mode}): term {part.spec.name}: wrote {write(part, Path(out))}"
                               f"{forced}")
            if module.reason:
                refused.append(module)
            continue
        if module.source is None:
            refused.append(module)
            click.echo(f"{spec.name} ({spec.mode}): no Triton module: {module.reason}")
            continue
        click.echo(f"{spec.name} ({spec.mode}): wrote {write(module, Path(out))}{forced}")
    if standalone:
        write_host(Path(out))
        click.echo(f"the modules' shared host runtime: wrote {Path(out) / HOST_PACKAGE}")
    _verify(build_cases(modules, backend, force, dtypes, lens, head_dim))
    if refused and backend != "torch":
        names = ", ".join(f"{m.spec.name} ({m.spec.mode})" for m in refused)
        raise PlanError(f"no Triton module for {names} (reasons above); the torch backend was verified. Use "
                        "--backend torch to verify without generating")


def _names(text: str, name: str) -> list:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise click.BadParameter(f"{text!r}: expected a comma-separated list", param_hint=name)
    return values


@main.command(context_settings=CONTEXT)
@click.argument("specs", nargs=-1)
@click.option("--all", "all_specs", is_flag=True, help="All built-in specs (both modes; the gated ones causal only).")
@click.option("--mode", type=click.Choice(["both", "causal", "bidirectional"]), default="both", show_default=True,
              help="Which modes of each spec (a gated spec is causal only).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a constant, e.g. M=4096.")
@click.option("--arch", "archs", default="sm_90,sm_80", show_default=True, help="Comma-separated GPU archs.")
@click.option("--head-dim", "head_dims", default="64,128", show_default=True, help="Comma-separated head dims.")
@click.option("--dtype", "dtypes", default="bfloat16,float16,float32", show_default=True,
              help="Comma-separated input dtypes.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the rows to this file: a list of objects with the keys module, kernel, arch, dtype, "
                   "head_dim, status, regs, spill_bytes, shared_bytes (and error for status error).")
@click.option("--smem-limit", type=click.IntRange(1), default=None,
              help="Shared memory per block in bytes for every arch [default: the arch's opt-in maximum, 232448 on "
                   "sm_90, 166912 on sm_80].")
@click.option("--jobs", "-j", type=click.IntRange(1), default=None,
              help="Modules compiled at once [default: the CPU count].")
def aot(specs, all_specs, mode, sets, archs, head_dims, dtypes, json_file, smem_limit, jobs):
    """Compile Triton kernels ahead of time.

    Compile the Triton kernels of SPECS (built-in names, YAML files or generated modules .py) ahead of time for
    NVIDIA GPUs, without one, at the launch configurations the host uses (recorded by running the modules under
    the Triton interpreter, forward and backward). Prints registers, spill stores and shared memory per
    configuration. Exit 1 when a configuration needs more shared memory than the arch has (smem) or fails to
    compile (error)."""
    import os
    import tempfile

    from attngen import aot as stage
    from attngen.build import generate
    archs, dtypes = _names(archs, "--arch"), _names(dtypes, "--dtype")
    dims = _int_list(head_dims, "--head-dim")
    stage.check(archs, dtypes)
    files = [s for s in specs if s.endswith(".py")]
    spec_names = [s for s in specs if not s.endswith(".py")]
    modules = []
    if spec_names or all_specs or not files:
        for spec in _specs(spec_names, all_specs, mode, sets):
            module = generate(spec)
            for part in module.parts or (module,):  # a spec with terms: its terms' modules
                if part.source is None:
                    click.echo(f"{part.spec.name} ({part.spec.mode}): no Triton module: {part.reason}", err=True)
                modules.append(part)
    with tempfile.TemporaryDirectory(prefix="attngen-aot-") as folder:
        rendered, same = stage.distinct([m for m in modules if m.source is not None])
        for m, twin in same.items():
            click.echo(f"{m.spec.name} ({m.spec.mode}): the same kernels as {twin.spec.name} ({twin.spec.mode}), "
                       "compiled once", err=True)
        srcs = stage.sources(rendered, files, Path(folder))
        if not srcs:
            raise PlanError("no Triton module to compile among the specs given (reasons above)")
        click.echo(f"compiling the kernels of {len(srcs)} modules for {', '.join(archs)} at head dims "
                   f"{', '.join(map(str, dims))} in {', '.join(dtypes)}", err=True)
        results = stage.run(srcs, archs, dims, dtypes, smem_limit=smem_limit, jobs=jobs or os.cpu_count() or 1,
                            progress=lambda line: click.echo(line, err=True))
    _table(*stage.table(results))
    errors = [r for res in results for r in res.rows if r.status == "error"]
    for r in errors:
        click.echo(f"error: {r.module}.{r.kernel} ({r.arch}, {r.dtype}, head dim {r.head_dim}): {r.error}")
    click.echo("\n" + stage.summary(results, smem_limit))
    if json_file:
        stage.write_json(results, Path(json_file))
        click.echo(f"rows written to {json_file}")
    bad = [r for res in results for r in res.rows if r.status != "ok"]
    if bad:
        click.echo(f"attngen aot: {len(bad)} configurations are not ok ({sum(r.status == 'smem' for r in bad)} smem, "
                   f"{len(errors)} error)", err=True)
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@click.argument("spec")
@click.option("--seq-len", "-n", "lengths", default="256,512,1024,2048", show_default=True,
              help="Comma-separated sequence lengths T.")
@click.option("--mode", type=click.Choice(["causal", "bidirectional"]), default=None, help="Override the spec's mode.")
@click.option("--plan", "plans", multiple=True,
              help="An ordering to measure (repeatable) [default: every legal ordering but recurrent, which runs a "
                   "whole sequence one token at a time].")
@click.option("--peer", "peers", multiple=True, type=click.Choice(["reference", "sdpa"]),
              help="A peer to measure beside (repeatable) [default: reference and sdpa].")
@click.option("--no-peers", is_flag=True, help="Measure the orderings only.")
@click.option("--backend", type=click.Choice(["torch", "triton"]), default="torch", show_default=True,
              help="The backend whose orderings are measured (triton: on a CUDA GPU only).")
@click.option("--batch", "-b", type=click.IntRange(1), default=1, show_default=True, help="Batch size B.")
@click.option("--heads", type=click.IntRange(1), default=4, show_default=True, help="Heads H.")
@click.option("--head-dim", "-d", type=click.IntRange(1, 1024), default=64, show_default=True, help="Head dim D.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]), default="float32",
              show_default=True, help="Input dtype.")
@click.option("--min-time", type=click.FloatRange(0.001), default=0.2, show_default=True,
              help="Seconds of timed runs per measurement (torch.utils.benchmark's blocked_autorange).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a constant, e.g. M=4096.")
@click.option("--out", type=click.Path(file_okay=False), default="bench/results", show_default=True,
              help="Folder for <date>-<device>-bench-<spec>-<mode>.md and .json (and the PNGs).")
@click.option("--plot", is_flag=True,
              help="Also write -time.png and -memory.png: log-log against T, a line per ordering and peer "
                   "(needs matplotlib: pip install 'attngen[plot]').")
@click.pass_context
def bench(ctx, spec, lengths, mode, plans, peers, no_peers, backend, batch, heads, head_dim, dtype, min_time, sets,
          out, plot):
    """Time and memory of SPEC's orderings vs T.

    Measure SPEC (a YAML file or built-in name) on this machine at each --seq-len: the forward time (the fastest
    block of torch.utils.benchmark's blocked_autorange) and peak memory of the op compiled with each ordering
    forced, beside the naive reference and PyTorch SDPA (exact softmax of the same shape). Prints the Markdown
    tables and writes them to --out with the same rows as JSON (always), and with --plot the PNG plots. One
    progress line per measurement on stderr."""
    from attngen import bench as stage
    from attngen.frontend.spec import load_spec
    if plot:
        stage.check_plotting()  # before anything is measured
    if no_peers and peers:
        raise click.UsageError("--no-peers and --peer contradict each other: give one of them")
    overrides = _overrides(sets)
    if mode:
        overrides["causal"] = mode == "causal"
    loaded = load_spec(spec, **overrides)
    result = stage.run(loaded, _int_list(lengths, "--seq-len"), backend=backend, series=plans,
                       peers=() if no_peers else (peers or stage.PEERS), batch=batch, heads=heads,
                       head_dim=head_dim, dtype=dtype, min_time=min_time, command=_command_line(ctx, "attngen bench"),
                       echo=lambda line: click.echo(line, err=True))
    click.echo(stage.markdown(result))
    for path in stage.write(result, Path(out), with_plot=plot):
        click.echo(f"written to {path}")


def _command_line(ctx, prog: str) -> str:
    """The command as the user could retype it: ``prog``, the arguments, and every option not left at its default."""
    import shlex
    words = prog.split()
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if ctx.get_parameter_source(param.name) == click.core.ParameterSource.DEFAULT or value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(param, click.Argument):
            words += [str(v) for v in values]
        elif getattr(param, "is_flag", False):
            words += [param.opts[0]] if value else []
        else:
            for v in values:
                words += [param.opts[0], str(v)]
    return shlex.join(words)


def _table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    click.echo("  ".join("-" * w for w in widths))
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()

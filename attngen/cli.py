"""The attngen command line: list, plan, verify, build, aot.

Exit codes: 0 success, 1 a verification failed (aot: a kernel over shared memory or failing to compile), 2 bad
input (one clear message; --debug shows the traceback).
"""
from __future__ import annotations

import sys
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

    SPEC is a YAML file or a built-in name (see `attngen list`)."""
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
    """List the built-in specs with their classes and chosen plans (d = 64)."""
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
@click.option("--head-dim", "-d", type=click.IntRange(1, 1024), default=64, show_default=True)
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
    """Show how the planner rewrote SPEC, the cost table, and the chosen ordering."""
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
                     show_default=True),
        click.option("--backend", type=click.Choice(["torch", "triton", "auto"]), default=None,
                     help="verify: torch (default), triton or auto; build: both torch and triton (default), "
                          "or one of them."),
        click.option("--plan", "force", default=None, help="Force an ordering (default: the planner's choice)."),
        click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float64", "float32", "float16"]),
                     help="Input dtypes (repeatable) [default: float64, float32]."),
        click.option("--seq-len", "lengths", default="7,63,200", show_default=True,
                     help="Comma-separated sequence lengths."),
        click.option("--head-dim", type=click.IntRange(1, 1024), default=16, show_default=True),
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
    """Run the cases (attngen.verify.Case), one progress line each; print the table; raise VerificationError on a
    failure and a usage error when there is nothing to verify."""
    import torch

    from attngen.verify import run_case
    if not cases:
        raise click.UsageError("nothing to verify: no case matches the specs, backend and options given")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for n, case in enumerate(cases, 1):
        r = run_case(case, device=device)
        results.append(r)
        # one line per case, to stderr: progress that also reads well in a non-terminal log
        click.echo(f"[{n}/{len(cases)}] {case.id}: {'pass' if r.passed else 'FAIL'}", err=True)
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


def _use_interpreter_without_gpu():
    """On a machine without CUDA the Triton kernels run under the interpreter (must precede importing triton)."""
    import os

    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@main.command(context_settings=CONTEXT)
@_verify_options
def verify(specs, all_specs, mode, backend, force, dtypes, lengths, head_dim, sets):
    """Check compiled ops against the naive reference: output and every gradient (and the decode step of
    decodable specs)."""
    from attngen.verify import verify_cases
    backend = backend or "torch"
    if backend != "torch":
        _use_interpreter_without_gpu()
    _verify(verify_cases(_specs(specs, all_specs, mode, sets), backend, force, dtypes,
                         _checked_lengths(lengths), head_dim))


@main.command(context_settings=CONTEXT)
@_verify_options
@click.option("--out", type=click.Path(file_okay=False), default="generated", show_default=True,
              help="Folder for the generated modules (<name>_<mode>.py).")
@click.option("--standalone", is_flag=True,
              help="Also write the modules' shared host runtime to --out/attngen_host, so that they run without "
                   "attngen installed (put --out on sys.path).")
def build(specs, all_specs, mode, backend, force, dtypes, lengths, head_dim, sets, out, standalone):
    """Generate each SPEC's Triton module (where its plan has templates), write it to --out, and verify
    it (natively on a GPU, under the Triton interpreter on a CPU) and the torch backend against the
    naive reference."""
    from attngen.build import HOST_PACKAGE, generate, write, write_host
    from attngen.verify import build_cases
    _use_interpreter_without_gpu()
    lens = _checked_lengths(lengths)
    modules, refused = [], []
    for spec in _specs(specs, all_specs, mode, sets):
        module = generate(spec)
        modules.append(module)
        if module.parts:  # a spec with terms: one module per term, combined by the op
            for part in module.parts:
                if part.source is None:
                    click.echo(f"{spec.name} ({spec.mode}): term {part.spec.name}: no Triton module: {part.reason}")
                else:
                    click.echo(f"{spec.name} ({spec.mode}): term {part.spec.name}: wrote {write(part, Path(out))}")
            if module.reason:
                refused.append(module)
            continue
        if module.source is None:
            refused.append(module)
            click.echo(f"{spec.name} ({spec.mode}): no Triton module: {module.reason}")
            continue
        click.echo(f"{spec.name} ({spec.mode}): wrote {write(module, Path(out))}")
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
@click.option("--mode", type=click.Choice(["both", "causal", "bidirectional"]), default="both", show_default=True)
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
    """Compile the Triton kernels of SPECs (built-in names, YAML files or generated modules .py) ahead of time for
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


def _table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    click.echo("  ".join("-" * w for w in widths))
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()

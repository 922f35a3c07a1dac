"""The attngen command line: list, plan, verify, build, bench.

Exit codes: 0 success, 1 a verification failed, 2 bad input (one clear message; --debug shows the traceback).
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from attngen.errors import AttngenError, VerificationError

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


@main.command("list", context_settings=CONTEXT)
def list_cmd():
    """List the built-in specs with their classes and chosen plans (d = 64)."""
    from attngen import pipeline
    from attngen.frontend.spec import builtin_names, load_spec
    rows = []
    for name in builtin_names():
        spec = load_spec(name)
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
    p = pipeline.plan(load_spec(spec, **overrides), target=target, head_dim=head_dim, force=force)
    click.echo(p.explain(n=seq_len, head_dim=head_dim))
    if trace:
        click.echo("\npipeline trace:")
        _table(["stage", "pass", "what it did"], pipeline.trace(p))
    if dot_file:
        Path(dot_file).write_text(to_dot(p))
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
    from attngen.frontend.spec import builtin_names, load_spec
    names = list(names) + (builtin_names() if all_specs else [])
    if not names:
        raise click.UsageError("name at least one SPEC (a YAML file or built-in name), or pass --all")
    return [load_spec(n, causal=c, **_overrides(sets)) for n in names for c in _modes(mode)]


def _verify(cases, force, dtypes, lengths, head_dim) -> list:
    """cases: (spec, backend, default dtypes). Prints the table; raises VerificationError on a failure."""
    import torch

    from attngen.op import compile as compile_op
    from attngen.verify import DTYPES, verify_case
    lens = _int_list(lengths, "--seq-len")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [c if len(c) == 4 else (*c, force) for c in cases]  # (spec, backend, default dtypes, plan)
    work = [(spec, backend, DTYPES[d], t, plan) for spec, backend, default, plan in cases
            for d in (dtypes or default) for t in lens]
    results = []
    with click.progressbar(work, label="verifying", file=sys.stderr, show_pos=True,
                           item_show_func=lambda c: c and f"{c[0].name} {c[0].mode} {c[1]} T{c[3]}") as bar:
        for spec, backend, dtype, t, plan in bar:
            op = compile_op(spec, backend=backend, plan=plan)
            results.append(verify_case(op, spec, dtype=dtype, t=t, dk=head_dim, seed=t, device=device))
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
               "same-dtype reference's error), or within 8 units of roundoff absolute)")
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
    """Check compiled ops against the naive reference: output and every gradient."""
    backend = backend or "torch"
    if backend != "torch":
        _use_interpreter_without_gpu()
    default = ("float64", "float32") if backend == "torch" else ("float32", "float16")
    _verify([(s, backend, default) for s in _specs(specs, all_specs, mode, sets)], force, dtypes, lengths,
            head_dim)


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
    _use_interpreter_without_gpu()
    cases = []
    for spec in _specs(specs, all_specs, mode, sets):
        module = generate(spec)
        if backend in (None, "torch"):
            cases.append((spec, "torch", ("float64", "float32")))
        if module.source is None:
            click.echo(f"{spec.name} ({spec.mode}): no Triton module: {module.reason}")
            continue
        click.echo(f"{spec.name} ({spec.mode}): wrote {write(module, Path(out))}")
        if backend in (None, "triton", "auto"):
            cases.append((spec, backend or "triton", ("float32", "float16")))
            if force is None and len(module.orderings) > 1:  # the dispatch reaches one side only at some lengths:
                cases += [(spec, backend or "triton", ("float32", "float16"), o.value) for o in module.orderings]
    if standalone:
        write_host(Path(out))
        click.echo(f"the modules' shared host runtime: wrote {Path(out) / HOST_PACKAGE}")
    _verify(cases, force, dtypes, lengths, head_dim)


def _table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    click.echo("  ".join("-" * w for w in widths))
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()

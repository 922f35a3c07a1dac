"""The attngen command: every subcommand's --help, exit codes 0 / 1 / 2, one-line errors, --debug."""
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import attngen
from attngen.cli import main
from attngen.errors import SpecError

COMMANDS = ["list", "plan", "verify", "build", "aot", "bench"]


@pytest.fixture
def run():
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(run, command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output and command in result.output


def test_list(run):
    result = run("list")
    assert result.exit_code == 0
    for name in ("cosformer", "softmax", "retention"):
        assert name in result.output


def test_plan_prints_derivation_costs_and_writes_dot(run, tmp_path):
    dot = tmp_path / "g.dot"
    result = run("plan", "cosformer", "--seq-len", "1000", "--head-dim", "32", "--dot", str(dot))
    assert result.exit_code == 0, result.output
    assert "expand-trig" in result.output and "cost at n = 1000, d = 32" in result.output
    assert dot.read_text().startswith("strict digraph cosformer")


def test_plan_with_override_and_mode(run):
    result = run("plan", "cosformer", "--set", "M=4096", "--mode", "bidirectional")
    assert result.exit_code == 0
    assert "M = 4096" in result.output and "(bidirectional)" in result.output


@pytest.mark.parametrize("args,needle", [
    (["plan", "nosuch"], "no spec file or built-in spec named 'nosuch'"),
    (["plan", "cosformer", "--set", "Q=3"], "unknown override(s) ['Q']"),
    (["plan", "softmax", "--plan", "linear"], "not legal"),
    (["verify"], "name at least one SPEC"),
    (["verify", "cosformer", "--seq-len", "a,b"], "expected comma-separated integers"),
    (["plan", "cosformer", "--set", "M"], "expected KEY=VALUE"),
])
def test_bad_input_exits_2_with_one_message(run, args, needle):
    result = run(*args)
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output


def test_bad_spec_file(run, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nsimilarity: relu(q) + dot(q, k)\n")
    result = run("plan", str(path))
    assert result.exit_code == 2
    assert str(path) in result.output and "similarity" in result.output


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "plan", "nosuch"])
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "SpecError"


def test_verify_passes_with_exit_0(run):
    result = run("verify", "linear_elu", "--seq-len", "7", "--dtype", "float64")
    assert result.exit_code == 0, result.output
    assert "3 passed, 0 failed" in result.output  # causal, bidirectional, and the causal mode's decode step
    assert "linear_elu (causal): pass (2 cases)" in result.output


def test_failed_verification_exits_1(run, monkeypatch):
    from attngen.runtime.torch import backend as torch_backend
    real = torch_backend.run
    monkeypatch.setattr(torch_backend, "run", lambda *a, **kw: real(*a, **kw) * 1.001)  # a 0.1% error
    result = run("verify", "linear_elu", "--seq-len", "7", "--dtype", "float64", "--mode", "causal")
    assert result.exit_code == 1
    assert "FAIL" in result.output and "verification failed: linear_elu (causal, torch)" in result.output


def test_build_writes_modules_and_verifies(run, tmp_path):
    result = run("build", "cosformer", "softmax", "--mode", "causal", "--seq-len", "7", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cosformer_causal.py").is_file()
    assert (tmp_path / "softmax_causal.py").is_file()  # the quadratic ordering's module
    assert "triton" in result.output and "torch" in result.output


def test_cli_file_errors_are_one_message_and_exit_2(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["plan", "softmax", "--dot", str(tmp_path / "no" / "x.dot")])
    assert missing.exit_code == 2 and "cannot write the op graph there" in missing.output
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    out = runner.invoke(main, ["build", "softmax", "--out", str(not_a_folder), "--seq-len", "7"])
    assert out.exit_code == 2 and "is a file" in out.output
    long = runner.invoke(main, ["verify", "softmax", "--seq-len", "300000"])
    assert long.exit_code == 2 and "at most 4096" in long.output


def test_build_fails_when_no_triton_module_is_generated(tmp_path):
    """A spec the Triton templates cannot express: the torch backend is verified, the build exits 2 and says why;
    asking for the Triton backend alone verifies nothing, which is an error too (never '0 passed, 0 failed')."""
    spec = tmp_path / "sclamp.yaml"
    spec.write_text("name: sclamp\nsimilarity: exp(dot(q, k)/sqrt(d))\n"
                    "normalize: {kind: rowsum, eps: 1.0e-6, eps_mode: clamp}\n")
    base = ["build", str(spec), "--out", str(tmp_path / "gen"), "--seq-len", "7", "--mode", "causal"]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 2 and "no Triton module for sclamp (causal)" in result.output
    assert "passed, 0 failed" in result.output
    result = CliRunner().invoke(main, base + ["--backend", "triton"])
    assert result.exit_code == 2 and "nothing to verify" in result.output
    assert CliRunner().invoke(main, base + ["--backend", "torch"]).exit_code == 0


def test_written_modules_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert CliRunner().invoke(main, ["build", "linear_elu", "--out", str(tmp_path), "--seq-len", "7",
                                         "--mode", "causal", "--dtype", "float32"]).exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "linear_elu_causal.py").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# help texts, python -m attngen, did you mean, build --plan, progress lines, bench
# ---------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


@pytest.mark.parametrize("group", ["attngen", "benchmarks"])
def test_every_command_has_a_whole_summary_and_every_option_help(group):
    """`--help` lists each command's summary whole (click cuts one over 45 characters with '...'); every option has
    a help text; every argument is named in its command's help."""
    if group == "attngen":
        cli = main
    else:
        from benchmarks.cli import main as cli
    assert len(cli.commands) >= 6
    for name, command in cli.commands.items():
        summary = command.get_short_help_str(limit=45)
        assert summary and not summary.endswith("..."), f"{group} {name}: summary {summary!r} is cut"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"{group} {name} {param.opts}: no help text"
            else:
                assert param.human_readable_name in command.help, f"{group} {name}: {param.name} not described"
    listing = CliRunner().invoke(cli, ["--help"], terminal_width=80).output.split("Commands:")[1]
    assert "..." not in listing and all(n in listing for n in cli.commands)


def test_python_m_attngen_is_the_attngen_command():
    proc = subprocess.run([sys.executable, "-m", "attngen", "--help"], capture_output=True, text=True, env=_env(),
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == CliRunner().invoke(main, ["--help"], prog_name="attngen").output
    assert "bench" in proc.stdout and "Usage: attngen" in proc.stdout


@pytest.mark.parametrize("name,suggestion", [("sofmax", "softmax"), ("cosfromer", "cosformer"),
                                             ("Retention", "retention"), ("cosfromer.yaml", "cosformer")])
def test_a_misspelt_builtin_name_gets_a_suggestion(name, suggestion):
    with pytest.raises(SpecError, match=f"did you mean '{suggestion}'"):
        attngen.load_spec(name)


def test_no_suggestion_for_a_name_like_none():
    with pytest.raises(SpecError) as info:
        attngen.load_spec("zzzqqq")
    assert "did you mean" not in str(info.value) and "attngen list" in str(info.value)


def test_did_you_mean_on_the_command_line():
    result = CliRunner().invoke(main, ["build", "cosfromer", "--seq-len", "7"])
    assert result.exit_code == 2 and "did you mean 'cosformer'" in result.output
    result = CliRunner().invoke(main, ["buidl", "cosformer"])
    assert result.exit_code == 2 and "Did you mean 'build'" in result.output  # click's, for a subcommand


def test_build_plan_writes_the_forced_modules_and_verifies_that_ordering(tmp_path):
    from attngen import pipeline
    from attngen.build import generate
    base = ["build", "linear_elu", "--mode", "causal", "--seq-len", "7", "--dtype", "float32", "--plan", "linear"]
    refused = CliRunner().invoke(main, base)  # into generated/: refused, nothing written
    assert refused.exit_code == 2 and "--out" in refused.output
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    spec = attngen.load_spec("linear_elu", causal=True)
    written = (tmp_path / "linear_elu_causal.py").read_text()
    assert written == pipeline.lower(pipeline.plan(spec, target="triton", force="linear"))
    assert written != generate(spec).source  # the planner's module also holds the quadratic kernels
    assert "plan linear forced" in result.output
    rows = [r for r in (line.split() for line in result.output.splitlines()) if r[:2] == ["linear_elu", "causal"]]
    assert {(r[3], r[2]) for r in rows} == {("torch", "linear"), ("torch", "step"), ("triton", "linear"),
                                            ("triton", "step")}
    illegal = CliRunner().invoke(main, ["build", "softmax", "--plan", "linear", "--out", str(tmp_path / "s")])
    assert illegal.exit_code == 2 and "not legal" in illegal.output and not (tmp_path / "s").exists()


def test_progress_is_one_line_per_spec_as_it_finishes(monkeypatch):
    """Each spec's line comes after its own cases ran and before the next spec's first case."""
    from attngen import verify
    real = verify.run_case

    def traced(case, device="cpu"):
        click.echo(f"RUN {case.id}", err=True)
        return real(case, device=device)

    monkeypatch.setattr(verify, "run_case", traced)
    result = CliRunner().invoke(main, ["verify", "linear_elu", "--seq-len", "7", "--dtype", "float64"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(("RUN ", "["))]
    assert [line.split(":")[0] for line in lines] == [
        "RUN linear_elu-causal-torch-auto-float64-T7", "RUN linear_elu-causal-torch-auto-float64-T7-step",
        "[1/2 specs, 2/3 cases] linear_elu (causal)", "RUN linear_elu-bidirectional-torch-auto-float64-T7",
        "[2/2 specs, 3/3 cases] linear_elu (bidirectional)"]
    assert "linear_elu (causal): pass (2 cases) in" in result.output


def test_progress_lines_reach_a_non_terminal_log_before_the_table():
    """stdout and stderr into one pipe (a CI log): the per-spec lines, flushed as they are printed, precede the
    table printed at the end."""
    proc = subprocess.run([sys.executable, "-m", "attngen", "verify", "linear_elu", "--seq-len", "7", "--dtype",
                           "float64"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("[1/2 specs"))
    second = next(i for i, line in enumerate(lines) if line.startswith("[2/2 specs"))
    table = next(i for i, line in enumerate(lines) if line.startswith("spec "))
    assert first < second < table


def _markdown_tables(text: str) -> dict:
    """{(title, T, series): cell} of the bench report's tables."""
    out, title, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            title, header = line[3:], None
        elif line.startswith("| T |"):
            header = [c.strip() for c in line.strip("|").split("|")][1:]
        elif line.startswith("| ") and header and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name, cell in zip(header, cells[1:]):
                out[(title, int(cells[0]), name)] = cell
    return out


def test_bench_writes_markdown_json_and_readable_plots(tmp_path):
    import matplotlib.image
    result = CliRunner().invoke(main, ["bench", "linear_elu", "--mode", "causal", "-n", "16,32", "--heads", "1",
                                       "-d", "8", "--min-time", "0.005", "--out", str(tmp_path), "--plot"])
    assert result.exit_code == 0, result.output
    stem = f"{datetime.date.today().isoformat()}-cpu-bench-linear_elu-causal"
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert data["spec"] == "linear_elu" and data["mode"] == "causal" and data["date"] in stem
    assert data["machine"] and data["command"].startswith("attngen bench linear_elu")
    series = {(r["series"], r["kind"]) for r in data["rows"]}
    assert series == {("quadratic", "ordering"), ("linear", "ordering"), ("reference", "peer"), ("sdpa", "peer")}
    assert sorted(r["T"] for r in data["rows"]) == [16] * 4 + [32] * 4
    for r in data["rows"]:
        assert math.isfinite(r["ms"]) and r["ms"] > 0, r
        assert r["peak_mib"] is not None and math.isfinite(r["peak_mib"]) and r["peak_mib"] >= 0, r
    cells = _markdown_tables((tmp_path / f"{stem}.md").read_text())
    assert len(cells) == 2 * len(data["rows"])  # a time table and a memory table
    for r in data["rows"]:
        assert float(cells[("Time (ms)", r["T"], r["series"])]) == pytest.approx(r["ms"], rel=1e-3)
        assert float(cells[("Peak memory (MiB)", r["T"], r["series"])]) == pytest.approx(r["peak_mib"], rel=1e-3,
                                                                                          abs=1e-9)
    for kind in ("time", "memory"):
        png = tmp_path / f"{stem}-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 0.01  # not a blank canvas


def test_bench_memory_sees_the_reference_materialise_t_by_t():
    """The measured peak of the naive reference at T = 1024 holds at least its [T, T] float32 weights (4 MiB), and
    SDPA's (tiled) stays below: the measurement sees what a call allocates."""
    from attngen import bench
    if bench.memory_method(torch.device("cpu")) is None:
        pytest.skip("peak memory is not measurable on this platform (no /proc/self/clear_refs)")
    result = bench.run(attngen.load_spec("softmax", causal=False), [1024], series=["quadratic"], heads=1,
                       head_dim=8, min_time=0.001)
    rows = {r.series: r for r in result.rows}
    assert rows["reference"].peak_mib >= 1024 * 1024 * 4 / 2 ** 20
    assert rows["sdpa"].peak_mib < rows["reference"].peak_mib


def test_bench_errors_before_measuring(tmp_path, monkeypatch):
    out = tmp_path / "r"
    illegal = CliRunner().invoke(main, ["bench", "softmax", "--plan", "linear", "-n", "16", "--out", str(out)])
    assert illegal.exit_code == 2 and "not legal" in illegal.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    missing = CliRunner().invoke(main, ["bench", "softmax", "-n", "16", "--out", str(out), "--plot"])
    assert missing.exit_code == 2 and "pip install 'attngen[plot]'" in missing.output
    assert not out.exists()

"""The attngen command: every subcommand's --help, exit codes 0 / 1 / 2, one-line errors, --debug."""
import os

import pytest
from click.testing import CliRunner

from attngen.cli import main

COMMANDS = ["list", "plan", "verify", "build"]


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
    assert "linear_elu-causal-torch-auto-float64-T7-step: pass" in result.output


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

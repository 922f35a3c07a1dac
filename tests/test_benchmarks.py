"""The benchmarks command (``python -m benchmarks <benchmark>``, benchmarks/cli.py): one subcommand per
benchmark, a table written to --out, exit 2 for bad input (nothing written), exit 1 when every measurement
failed (nothing written)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import benchmarks.common
import benchmarks.cpu
from benchmarks.cli import main

SUBCOMMANDS = ["linear", "decode", "sparse", "conv-basis", "conv-basis-error", "toeplitz", "gpu", "cpu", "window",
               "minilm-swap", "cp"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run():
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args))


def test_group_help_lists_every_benchmark(run):
    result = run("--help")
    assert result.exit_code == 0, result.output
    for name in SUBCOMMANDS:
        assert name in result.output


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(run, command):
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and command in result.output and "--out" in result.output


def test_cp_refuses_lengths_the_ranks_do_not_divide(run, tmp_path):
    result = run("cp", "--world", "3", "--min-len", "1000", "--out", str(tmp_path))
    assert result.exit_code == 2 and "--min-len" in result.output and not list(tmp_path.iterdir())


def test_an_unknown_benchmark_is_a_usage_error(run):
    result = run("bogus")
    assert result.exit_code == 2
    assert "No such command" in result.output and "bogus" in result.output


def test_the_old_flags_are_usage_errors(run):
    result = run("--decode")
    assert result.exit_code == 2
    assert "No such option" in result.output and "--decode" in result.output


def test_decode_writes_a_table_from_any_directory(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the workers (python -m benchmarks.common) find the package through PYTHONPATH
    result = run("decode", "--max-len", "1024", "--tokens", "2", "--out", "results")
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "results").glob("*-cpu-decode.md")
    text = path.read_text()
    assert "| 1024 |" in text and "error" not in text
    assert "decode state bytes equal at every T (133128 bytes): PASS" in text  # B1 H8 D64 linear_elu: (8*64*65)*4+8
    assert "- command: `python -m benchmarks decode --spec linear_elu --max-len 1024 --tokens 2`" in text


def test_toeplitz_writes_a_table(run, tmp_path):
    result = run("toeplitz", "--max-len", "1024", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*-cpu-toeplitz.md")
    text = path.read_text()
    assert "| 256 |" in text and "| 1024 |" in text and "| 2048 |" not in text
    assert "cost model (d = 32): quadratic for n <" in text and "fft above" in text
    assert "- command: `python -m benchmarks toeplitz --max-len 1024`" in text


def test_window_writes_a_table(run, tmp_path):
    """(with --memory: the allocation columns)"""
    result = run("window", "--min-len", "256", "--max-len", "1024", "--heads", "1", "--repeats", "1", "--memory",
                 "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*-window.md")
    text = path.read_text()
    assert "| 256 |" in text and "| 1024 |" in text and "| 2048 |" not in text
    assert "T = 1024 / T = 256: forward" in text and "window 256" in text
    assert "- command: `python -m benchmarks window --min-len 256 --max-len 1024 --window 256 --heads 1 " in text
    assert "--repeats 1 --memory`" in text
    assert "| fwd + bwd tensors allocated | MiB allocated | MiB / 1k tokens | MiB in tensors >= 1 MiB |" in text
    rows = {t: line.split("|")[7:11] for line in text.splitlines() for t in (256, 1024) if line.startswith(f"| {t} |")}
    counts = {t: int(r[0]) for t, r in rows.items()}
    assert 0 < counts[256] < counts[1024]  # four times the query tiles, each recomputed in backward
    assert all(float(r[1]) > 0 and 0 <= float(r[3]) <= float(r[1]) for r in rows.values())


def test_allocation_counter_counts_new_storages_only():
    import torch

    from benchmarks.window import _Allocations
    x = torch.zeros(1000)
    with _Allocations() as counted:
        y = x + 1  # a new tensor of 4000 bytes
        x.add_(1)  # in place
        y[10:].view(2, 495)  # views
        torch.ones(2**18 + 1)  # one of 1 MiB and more
    assert (counted.count, counted.bytes, counted.large) == (2, 4000 + 4 * (2**18 + 1), 4 * (2**18 + 1))


def test_decode_refuses_a_spec_without_a_state(run, tmp_path):
    result = run("decode", "--spec", "softmax", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "benchmarks: error:" in result.output and "softmax" in result.output
    assert "no linear (separable) form" in result.output and "no constant-size state" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["linear", "decode"])
def test_an_unknown_spec_exits_2_without_writing(run, tmp_path, command):
    result = run(command, "--spec", "nonexistent", "--max-len", "1024", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "benchmarks: error:" in result.output and "no spec file or built-in spec named" in result.output
    assert "nonexistent" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_linear_refuses_a_spec_without_a_linear_plan(run, tmp_path):
    result = run("linear", "--spec", "softmax", "--max-len", "1024", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "benchmarks: error:" in result.output and "softmax" in result.output
    assert not list(tmp_path.iterdir())


def test_every_measurement_failing_exits_1_without_writing(run, tmp_path, monkeypatch):
    def failing(module, *args):
        return [sys.executable, "-c", "raise SystemExit('worker exploded')"]
    monkeypatch.setattr(benchmarks.common, "worker_command", failing)
    result = run("decode", "--max-len", "1024", "--tokens", "2", "--out", str(tmp_path))
    assert result.exit_code == 1
    assert "every measurement failed" in result.output and "worker exploded" in result.output
    assert not list(tmp_path.iterdir())


def test_python_dash_m_benchmarks_runs_from_the_repository_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: python -m benchmarks" in proc.stdout and "conv-basis-error" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: the benchmark would run")
def test_gpu_needs_cuda_and_writes_nothing(run, tmp_path):
    result = run("gpu", "--quick", "--out", str(tmp_path))
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_gpu_report_has_ratios_and_the_memory_floor():
    from benchmarks import gpu
    rows = [gpu.Row("relu_linear", (8, 1024, 8, 64), "fwd", 2.0, "fla chunk_linear_attn", 1.0, 0.5),
            gpu.Row("softmax", (1, 8192, 8, 64), "fwd+bwd", 3.0, "SDPA flash", 4.0, 1.5),
            gpu.Row("based", (8, 1024, 8, 64), "fwd", 1.0, "not installed (fla)", None, 0.1)]
    text = gpu.report(rows, 4000.0, "GPU X", "python -m benchmarks gpu", "2026-11-29")
    assert ("| relu_linear | B8 T1024 H8 D64 | fwd | 2.000 | fla chunk_linear_attn | 1.000 | 2.00 | 0.500 | 25% |"
            in text)
    assert "| softmax | B1 T8192 H8 D64 | fwd+bwd | 3.000 | SDPA flash | 4.000 | 0.75 | 1.500 | 50% |" in text
    assert "| based | B8 T1024 H8 D64 | fwd | 1.000 | not installed (fla) | - | - |" in text
    assert "geometric mean of attngen / peer over 2 rows: 1.22" in text and "4000 GB/s" in text


def test_cpu_writes_markdown_and_json_with_every_peer_agreeing(run, tmp_path):
    """A tiny run of the CPU comparison: every section present, every peer's output equal to attngen's (the
    error columns), the JSON beside the table."""
    import json
    result = run("cpu", "--max-len", "128", "--threads", "1", "--repeats", "1", "--tokens", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    (md,) = tmp_path.glob("*-cpu-torch-backend.md")
    data = json.loads(md.with_suffix(".json").read_text())
    part = data["threads"]["1"]
    assert {r["spec"] for r in part["decode"]} == set(benchmarks.cpu.DECODE_SPECS)
    assert all(r["relative_error_vs_hand"] < 1e-4 for r in part["decode"])
    assert all(r["error_vs_sdpa"] < 1e-4 for r in part["softmax"]) and len(part["softmax"]) == 2
    assert all(r["error_vs_loop"] < 1e-3 for r in part["linear"])
    assert all(r["error_vs_fla"] < 1e-3 for r in part["retention"])
    assert "Decode" in md.read_text() and "SDPA" in md.read_text()


def test_cpu_refuses_bad_thread_counts(run, tmp_path):
    result = run("cpu", "--threads", "0,x", "--out", str(tmp_path))
    assert result.exit_code == 2 and not list(tmp_path.iterdir())


def test_linear_writes_json_and_plots_of_its_rows(run, tmp_path, monkeypatch):
    """`linear --plot` on stand-in workers (instant, their numbers chosen here): the JSON holds each worker's time
    and memory allocated at the peak, the PNGs are images."""
    import json

    import matplotlib.image
    seconds = {"attngen-linear": 0.002, "sdpa": 0.003, "reference": 0.005}

    def fake(module, impl, spec_name, t, *rest):
        row = {"impl": impl, "T": t, "seconds": seconds[impl], "peak_rss": 300 * 2 ** 20 + t * 2 ** 10,
               "base_rss": 300 * 2 ** 20}
        return [sys.executable, "-c", f"import json; print(json.dumps({row!r}))"]
    monkeypatch.setattr(benchmarks.common, "worker_command", fake)
    result = run("linear", "--max-len", "2048", "--out", str(tmp_path), "--plot")
    assert result.exit_code == 0, result.output
    md = next(tmp_path.glob("*-cpu-linear-scaling.md"))
    data = json.loads(md.with_suffix(".json").read_text())
    got = {(r["series"], r["T"]): (r["ms"], r["peak_mib"]) for r in data["rows"]}
    assert got == {(impl, t): (pytest.approx(s * 1e3), pytest.approx(t / 1024)) for impl, s in seconds.items()
                   for t in (1024, 2048)}
    for kind in ("time", "memory"):
        png = tmp_path / f"{md.stem}-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).ndim == 3

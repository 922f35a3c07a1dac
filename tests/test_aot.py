"""`attngen aot`: the kernels of one module compiled for sm_90 without a GPU (one real run, about a minute on two
cores), its JSON rows, and the exit codes of a configuration over shared memory and of one that fails to compile.

The run's child processes (capture, compile) are recorded once; the smem test replays them with a lower limit.
"""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import attngen
from attngen import aot
from attngen.cli import main

ARGS = ["aot", "linear_elu", "--mode", "causal", "--arch", "sm_90", "--head-dim", "64", "--dtype", "float16"]
KERNELS = ["_linear_elu_fwd_kernel", "_linear_elu_bwd_dq_kernel", "_linear_elu_bwd_dkv_kernel",
           "_linear_elu_step_kernel", "_linear_elu_qfwd_kernel", "_linear_elu_qbwd_dq_kernel",
           "_linear_elu_qbwd_dkv_kernel", "_linear_elu_chunk_h_kernel", "_linear_elu_chunk_o_kernel",
           "_linear_elu_chunk_dh_kernel", "_linear_elu_chunk_dqkv_kernel"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The real run: (CLI result, its JSON rows, the child processes' outputs by kind)."""
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    children, child = {}, aot._child

    def record(args, env, path):
        children[args[0]] = child(args, env, path)
        return children[args[0]]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot, "_child", record)
        result = CliRunner().invoke(main, [*ARGS, "--json", str(out)])
    return result, json.loads(out.read_text()) if out.exists() else None, children


def test_help():
    result = CliRunner().invoke(main, ["aot", "--help"])
    assert result.exit_code == 0 and "--head-dim" in result.output and "shared memory" in result.output


def test_every_kernel_compiles_for_sm90(recorded):
    result, rows, _ = recorded
    assert result.exit_code == 0, result.output
    assert rows and all(list(r) == list(aot.KEYS) for r in rows)
    assert {r["status"] for r in rows} == {"ok"}
    assert [k for k in KERNELS if k not in {r["kernel"] for r in rows}] == []
    for r in rows:
        assert (r["module"], r["arch"], r["dtype"], r["head_dim"]) == ("linear_elu_causal", "sm_90", "float16", 64)
        assert 0 < r["regs"] <= 255 and r["spill_bytes"] >= 0 and 0 < r["shared_bytes"] <= aot.SMEM_LIMIT["sm_90"]
    # the flags the host passes: the linear forward plain, with a state, packed, and both
    fwd = [r for r in rows if r["kernel"] == "_linear_elu_fwd_kernel"]
    assert len(fwd) == 4
    assert f"{len(rows)} configurations: {len(rows)} ok, 0 smem, 0 error" in result.output, result.output


def test_a_lower_shared_memory_limit_gives_smem_and_exit_1(recorded, tmp_path, monkeypatch):
    _, rows, children = recorded
    monkeypatch.setattr(aot, "_child", lambda args, env, path: children[args[0]])
    limit = sorted(r["shared_bytes"] for r in rows)[len(rows) // 2]
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(main, [*ARGS, "--smem-limit", str(limit), "--json", str(out)])
    assert result.exit_code == 1, result.output
    got = json.loads(out.read_text())
    assert {r["status"] for r in got} == {"ok", "smem"}
    assert all((r["status"] == "smem") == (r["shared_bytes"] > limit) for r in got)
    assert all("error" not in r for r in got)


def test_a_kernel_that_fails_to_compile_is_an_error_row(recorded, tmp_path):
    """A copy of the module whose step kernel fails a static assertion: the compile child reports the message,
    the command writes an `error` row with it and exits 1."""
    from attngen.build import generate
    from attngen.frontend.spec import load_spec
    _, _, children = recorded
    text = generate(load_spec("linear_elu", causal=True)).source
    head = text.index("def _linear_elu_step_kernel(")
    body = text.index("):\n", head) + 3
    broken = tmp_path / "linear_elu_causal.py"
    broken.write_text(text[:body] + '    tl.static_assert(BK < 0, "an injected compile error")\n' + text[body:])
    # the real compile child on the step's launch alone (the other kernels are those of the first test)
    launches = tmp_path / "launches.json"
    captured = dict(children["capture"])
    captured["launches"] = [x for x in captured["launches"] if x["kernel"] == "_linear_elu_step_kernel"]
    launches.write_text(json.dumps(captured))
    raw = tmp_path / "raw.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "attngen.aot", "compile", str(broken), str(launches), str(raw), "sm_90"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    compiled = json.loads(raw.read_text())
    [row] = compiled["rows"]
    assert row["regs"] is None and "an injected compile error" in row["error"]
    # the command's report of it
    out = tmp_path / "rows.json"
    replay = {"capture": captured, "compile": compiled}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot, "_child", lambda args, env, path: replay[args[0]])
        result = CliRunner().invoke(main, ["aot", str(broken), "--arch", "sm_90", "--head-dim", "64",
                                           "--dtype", "float16", "--json", str(out)])
    assert result.exit_code == 1, result.output
    [got] = json.loads(out.read_text())
    assert got["status"] == "error" and "an injected compile error" in got["error"]
    assert list(got) == [*aot.KEYS, "error"]
    assert "an injected compile error" in result.output


@pytest.mark.parametrize("option, value", [("--arch", "sm_75"), ("--dtype", "float64"), ("--head-dim", "0")])
def test_bad_options_exit_2(option, value):
    result = CliRunner().invoke(main, ["aot", "linear_elu", "--mode", "causal", option, value])
    assert result.exit_code == 2
    assert value in result.output


def test_a_missing_module_file_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["aot", str(tmp_path / "nope.py")])
    assert result.exit_code == 2 and "no such module file" in result.output


def test_modules_with_the_same_kernels_compile_once():
    from attngen.build import generate

    softmax, taylor = (generate(attngen.load_spec(n)) for n in ("softmax", "based"))
    diff = generate(attngen.load_spec("diff_attention"))
    keep, same = aot.distinct([softmax, *diff.parts, taylor])
    # both halves of differential attention are softmax with its own name: the same kernels
    assert keep == [softmax, taylor] and same == {diff.parts[0]: softmax, diff.parts[1]: softmax}
    assert aot.kernel_text(softmax) != aot.kernel_text(taylor)

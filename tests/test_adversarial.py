"""Hostile specs: each fix of the adversarial review has a regression test here (the tag in its name), and a
hypothesis property drives generated adversarial specs (expression trees from the grammar with deep nesting,
huge and tiny numbers, power and exp towers, long and unicode names, duplicate keys, aliases, constant chains)
through load_spec and pipeline.plan: each either succeeds or raises SpecError / PlanError / InputError, within
5 s, under a hard alarm (a hang fails instead of blocking CI), and writes no file.

Tags: S1 (parameter inits at the call's head dim), SEC1 (spec text is never a path), OVERFLOW (constants beyond
float64), EXPONENT (limits through constants and nesting), NAMES, HEADDIM0, DUPLICATES, HANG (exp towers,
constant chains, alias bombs, size caps, devices and FIFOs)."""
import contextlib
import math
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import attngen
from attngen import pipeline
from attngen.errors import InputError, PlanError, SpecError
from attngen.frontend.spec import MAX_NAME, MAX_SPEC_BYTES, load_spec_file
from attngen.runtime.inputs import default_parameters

BASE = {"name": "t", "similarity": "dot(q, k)"}
SECOND = 1.0  # every refusal below is quick


@contextlib.contextmanager
def alarm(seconds: int):
    """A hard limit: SIGALRM raises in the test (main thread) after ``seconds``, so a hang fails."""
    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(source, match=None, seconds=SECOND, **overrides):
    """load_spec(source) raises SpecError (matching ``match``) within ``seconds``; returns the message."""
    start = time.perf_counter()
    with alarm(10), pytest.raises(SpecError) as info:
        attngen.load_spec(source, **overrides)
    assert time.perf_counter() - start < seconds, time.perf_counter() - start
    msg = str(info.value)
    if match is not None:
        assert match in msg, msg
    return msg


def qkv(d=16, t=8, h=2, dv=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, t, n, generator=g, dtype=dtype) for n in (d, d, dv or d))


# ---------------------------------------------------------------------------------------------
# S1: a parameter's init is evaluated at the call's head dim (it was evaluated at d = 0)
# ---------------------------------------------------------------------------------------------
SCALED = {**BASE, "reweight": "s", "parameters": {"s": {"shape": [], "init": "d/16"}}}
INV_SQRT = {**BASE, "reweight": "s", "parameters": {"s": {"shape": [], "init": "1/sqrt(d)"}}}


@pytest.mark.parametrize("runner", ["torch-op", "reference"])
def test_S1_init_uses_the_call_head_dim(runner):
    fn = attngen.compile(SCALED, backend="torch") if runner == "torch-op" else attngen.reference(SCALED)
    q, k, v = qkv(d=32)
    out = fn(q, k, v)
    explicit = fn(q, k, v, s=torch.tensor(2.0, dtype=torch.float64))  # d/16 at d = 32
    assert out.abs().max() > 0
    torch.testing.assert_close(out, explicit)


@pytest.mark.parametrize("runner", ["torch-op", "reference"])
def test_S1_init_with_sqrt_d_runs_with_and_without_the_parameter(runner):
    fn = attngen.compile(INV_SQRT, backend="torch") if runner == "torch-op" else attngen.reference(INV_SQRT)
    q, k, v = qkv(d=16)
    torch.testing.assert_close(fn(q, k, v), fn(q, k, v, s=torch.tensor(0.25, dtype=torch.float64)))


def test_S1_init_not_finite_at_the_head_dim_is_an_input_error_naming_the_parameter():
    spec = {**BASE, "reweight": "s", "parameters": {"s": {"shape": [], "init": "1/(d - 16)"}}}
    q, k, v = qkv(d=16)
    for fn in (attngen.compile(spec, backend="torch"), attngen.reference(spec)):
        with pytest.raises(InputError, match="'s'"):
            fn(q, k, v)
        fn(q, k, v, s=torch.tensor(1.0, dtype=torch.float64))  # passed: its init is not evaluated
    fn(*qkv(d=8))  # finite at d = 8


def test_S1_default_parameters_takes_the_head_dim():
    spec = attngen.load_spec(SCALED)
    assert float(default_parameters(spec, 2, torch.float64, head_dim=64)["s"]) == 4.0
    with pytest.raises(InputError, match="head_dim"):
        default_parameters(spec, 2, torch.float64)  # an init that uses d needs it
    assert default_parameters(attngen.load_spec("alibi"), 4)["slope"].shape == (4,)  # d not used: optional


def test_S1_verify_draws_parameters_at_the_head_dim():
    from attngen.verify import _inputs
    *_, params = _inputs(attngen.load_spec(SCALED), 1, 2, 8, 8, 32, 32, 0)
    assert abs(float(params["s"]) - 2.0) < 1.0  # around d/16 = 2 (+ 0.1 noise), not around 0


# ---------------------------------------------------------------------------------------------
# S5: a spec's max_length is enforced (decoding cosFormer with M = 16 went on silently: |o| ~ 1e7 at token 30)
# ---------------------------------------------------------------------------------------------
def _cosformer_tokens(n, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return [tuple(torch.randn(1, 2, 1, d, generator=g, dtype=dtype) for _ in range(3)) for _ in range(n)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_S5_decoding_past_max_length_is_refused(backend):
    op = attngen.compile(attngen.load_spec("cosformer", M=16), backend=backend)
    state = op.init_state(1, 2, 8, 8)
    outs = []
    for q, k, v in _cosformer_tokens(16):  # positions 0 .. 15: valid
        o, state = op.step(q, k, v, state)
        outs.append(o)
    assert torch.isfinite(torch.cat(outs, 2)).all() and int(state.pos) == 16
    q, k, v = _cosformer_tokens(1)[0]
    with pytest.raises(InputError, match="max_length 16"):
        op.step(q, k, v, state)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_S5_prefill_and_forward_past_max_length_are_refused(backend):
    op = attngen.compile(attngen.load_spec("cosformer", M=16), backend=backend)
    q, k, v = qkv(d=8, t=12, dtype=torch.float32)
    _, state = op(q, k, v, return_state=True)  # positions 0 .. 11
    with pytest.raises(InputError, match="positions up to 23"):
        op(q, k, v, initial_state=state)  # 12 .. 23
    long = qkv(d=8, t=17, dtype=torch.float32)
    with pytest.raises(InputError, match="max_length 16"):
        op(*long)
    assert torch.isfinite(op(*qkv(d=8, t=16, dtype=torch.float32))).all()


def test_S5_generated_module_refuses_past_max_length():
    from attngen.runtime.triton import loader
    spec = attngen.load_spec("cosformer", M=16)
    module = loader.load_module(pipeline.plan(spec, target="triton"))
    q, k, v = qkv(d=8, t=17, dtype=torch.float32)
    with pytest.raises(InputError, match="max_length 16"):
        module.cosformer_attention(q, k, v)
    S = torch.zeros(1, 2, 16, 8)  # F = 2 d: cos and sin of the position angle
    z = torch.zeros(1, 2, 16)
    q, k, v = _cosformer_tokens(1)[0]
    module.cosformer_step(q, k, v, S, z, torch.tensor([15]))  # position 15: the last valid one
    with pytest.raises(InputError, match="max_length 16"):
        module.cosformer_step(q, k, v, S, z, torch.tensor([16]))


def test_S5_reference_refuses_past_max_length_and_default_M_limits_nothing():
    with pytest.raises(InputError, match="max_length 16"):
        attngen.reference(attngen.load_spec("cosformer", M=16))(*qkv(d=8, t=17))
    spec = attngen.load_spec("cosformer")
    assert spec.max_length == "M" and not isinstance(spec.length_limit, int)  # max(n_q, n_k): per call
    assert torch.isfinite(attngen.reference(spec)(*qkv(d=8, t=40))).all()


@pytest.mark.parametrize("value, match", [(0, "1 .. 2**62"), (2.5, "1 .. 2**62"), ("d", "unknown"),
                                          ("exp(n_q)", "integer powers, max, min"), ("c - 10", "1 .. 2**62"),
                                          (True, "positive integer"), ("i", "number of positions")])
def test_S5_max_length_must_be_a_count_of_positions(value, match):
    refused({**BASE, "constants": {"c": 4}, "max_length": value}, match)


@pytest.mark.parametrize("runner", ["torch-op", "reference", "triton"])
def test_S5_a_length_dependent_max_length_is_evaluated_at_each_call(runner):
    spec = attngen.load_spec({**BASE, "causal": False, "max_length": "2 * n_q"})
    fn = (attngen.reference(spec) if runner == "reference"
          else attngen.compile(spec, backend="torch" if runner == "torch-op" else "triton"))
    q, k, v = qkv(t=9, dtype=torch.float32)
    assert torch.isfinite(fn(q[:, :, :5], k, v)).all()  # 9 keys <= 2 * 5
    with pytest.raises(InputError, match="max_length 8"):
        fn(q[:, :, :4], k, v)  # 9 keys > 2 * 4


def test_S5_max_length_forms_and_hash():
    base = attngen.load_spec(BASE)
    assert base.length_limit is None and "max_length" not in base.canonical()  # hashes of other specs unchanged
    assert attngen.load_spec({**BASE, "constants": {"c": 4}, "max_length": "2*c"}).length_limit == 8
    assert attngen.load_spec({**BASE, "max_length": "max(n_q, n_k)"}).length_limit is not None
    assert attngen.load_spec("cosformer", M="2 * n_q").max_length == "M"  # an override keeps the declared limit
    limited = attngen.load_spec({**BASE, "max_length": 32})
    assert limited.hash != base.hash and attngen.load_spec(limited.to_yaml()) == limited


# ---------------------------------------------------------------------------------------------
# SEC1: a plain string is a built-in name or YAML text, a path only when it ends in .yaml / .yml
# ---------------------------------------------------------------------------------------------
def test_SEC1_one_line_string_is_never_read_as_a_file(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("SECRET_TOKEN: hunter2\nsecond_line_marker: x\n")
    msg = refused(str(secret), "no spec file or built-in spec named")
    assert "SECRET" not in msg and "hunter2" not in msg and "second_line_marker" not in msg
    assert "ends in .yaml or .yml" in msg
    refused("/etc/passwd", "no spec file or built-in spec named")


def test_SEC1_paths_and_text_have_their_own_entry_points(tmp_path):
    text = yaml.safe_dump({**BASE, "name": "p"})
    for name in ("p.yaml", "p.yml", "p.txt"):
        (tmp_path / name).write_text(text)
    assert attngen.load_spec(str(tmp_path / "p.yaml")).name == "p"  # a str ending in .yaml / .yml is a path
    assert attngen.load_spec(str(tmp_path / "p.yml")).name == "p"
    assert attngen.load_spec(tmp_path / "p.txt").name == "p"  # a Path: any file
    assert load_spec_file(str(tmp_path / "p.txt")).name == "p"
    refused(str(tmp_path / "p.txt"), "no spec file or built-in spec named")
    assert attngen.load_spec("{name: x, similarity: 'dot(q, k)'}").name == "x"  # one-line YAML text
    assert attngen.load_spec("cosformer").name == "cosformer"


def test_SEC1_invalid_yaml_in_a_file_is_not_echoed(tmp_path):
    path = tmp_path / "bad.yaml"
    for text in ("a: !!python/object:SECRET_TAG {}\n", "a: 1\n\tb: 'SECRET_VALUE\n", "a: [SECRET_LIST\n",
                 "SECRET_KEY: 1\nSECRET_KEY: 2\n"):
        path.write_text(text)
        msg = refused(path, "invalid YAML at line")
        assert "SECRET" not in msg, msg


def test_SEC1_cli_takes_a_yaml_path_or_a_builtin_name(tmp_path):
    from click.testing import CliRunner

    from attngen.cli import main
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**BASE, "name": "mine"}))
    assert CliRunner().invoke(main, ["plan", str(path)]).exit_code == 0
    assert CliRunner().invoke(main, ["plan", "softmax"]).exit_code == 0
    result = CliRunner().invoke(main, ["plan", "/etc/passwd"])
    assert result.exit_code == 2 and "root:" not in result.output


# ---------------------------------------------------------------------------------------------
# OVERFLOW: constants beyond float64 are refused at load (they failed at call time)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1e30" + " * 1e30" * 10, "10**64 * 10**64 * 10**64 * 10**64 * 10**64",
                                   "exp(700) * exp(700)", "exp(exp(7))", "1e-30" + " * 1e-30" * 10,
                                   "n_q" + " * 1e30" * 11, "10**60 * 10**60 * 10**60 * 10**60 * 10**60 * 10**60 * n"])
def test_OVERFLOW_constant_beyond_float64_is_refused_at_load(value):
    refused({**BASE, "constants": {"c": value}, "reweight": "c"}, "beyond float64")


def test_OVERFLOW_through_constants_is_refused_at_load():
    refused({**BASE, "constants": {"a": "1e30**6", "b": "a * a"}, "reweight": "b"}, "beyond float64")
    refused({**BASE, "constants": {"a": "1e30**6", "b": "a * n_q"}, "reweight": "b * a"}, "beyond float64")
    refused({**BASE, "constants": {"a": "n_q", "b": "exp(exp(exp(exp(a - n_q + 1))))"}, "reweight": "b"},
            "beyond float64")
    refused({**BASE, "constants": {"a": "n_q", "b": "log(a - n_q)"}, "reweight": "b"}, "not a finite real number")
    refused({**BASE, "constants": {"a": "0"}, "reweight": "log(a)"}, "not a finite real number")


# ---------------------------------------------------------------------------------------------
# EXPONENT: the documented limits hold through constants and nesting
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,fragment", [
    ({"constants": {"c3": 4096}, "similarity": "dot(q, k)**c3"}, "power c3 = 4096 of a q/k expression"),
    ({"similarity": "(dot(q, k)**8)**8"}, "power 64 of a q/k expression"),
    ({"similarity": "dot(q, k)**8 * dot(q, k)**8"}, "16 dot() factors"),
    ({"similarity": "dot(q, k)**8 * dot(relu(q), relu(k))"}, "9 dot() factors"),
    ({"constants": {"c": 8}, "similarity": "(dot(q, k)**c)**c"}, "64"),
    ({"similarity": "9**9**9**9 * dot(q, k)"}, "would be huge"),
    ({"constants": {"c1": "9**9", "c2": "9**c1"}, "reweight": "c2"}, "too large"),
    ({"constants": {"c1": "9**2", "c2": "9**c1 * 9**c1 * 9**c1 * 9**c1"}, "reweight": "c2"}, "beyond float64"),
    ({"constants": {"c": 1000}, "reweight": "(i + j + 1)**c"}, "integer power c = 1000"),
    ({"reweight": "((i + 1)**16)**16"}, "integer power 256"),
    ({"constants": {"c": 16}, "reweight": "exp(-((i - j)**c)**2)"}, "integer power 32"),
    ({"constants": {"c": "(n_q + 1)**16"}, "reweight": "c**16"}, "integer power 256"),
    ({"reweight": "exp(-(i - j)**32)"}, "integer power 32"),
    ({"reweight": "(1 + i + j + n_q)**12"}, "terms"),
    ({"reweight": "cos(i + j + n_q*i + n_k*j + d*i)"}, "sin, cos and tanh"),
], ids=["constant-exponent", "power-of-power", "product-of-powers", "mixed-degree", "constant-power-of-power",
        "tower", "constant-tower", "constant-overflow", "constant-integer-power", "integer-power-of-power",
        "constant-power-in-exp", "constant-power-of-sum", "power-in-exp", "expansion", "trig"])
def test_EXPONENT_limits_hold_through_constants_and_nesting(spec, fragment):
    refused({**BASE, **spec}, fragment)


def test_EXPONENT_builtins_are_within_the_limits():
    for spec in attngen.builtin_specs():
        for part in [t.spec for t in spec.terms] or [spec]:  # a spec with terms: each term is planned
            pipeline.plan(part)


# ---------------------------------------------------------------------------------------------
# NAMES: fullmatch (no trailing newline), at most MAX_NAME characters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["name", "constant", "parameter", "parameter-list"])
@pytest.mark.parametrize("name", ["t\n", "x" * (MAX_NAME + 1), "x" * 300, "tä", "a b"])
def test_NAMES_are_identifiers_of_bounded_length(where, name):
    spec = {"name": {**BASE, "name": name},
            "constant": {**BASE, "constants": {name: 1}},
            "parameter": {**BASE, "parameters": {name: 0.5}},
            "parameter-list": {**BASE, "parameters": [{"name": name, "init": 0.5}]}}[where]
    refused(spec, "name")


def test_NAMES_of_the_longest_length_load():
    name = "x" * MAX_NAME
    spec = attngen.load_spec({**BASE, "name": name, "constants": {name: 2}, "reweight": name})
    assert spec.name == name


# ---------------------------------------------------------------------------------------------
# HEADDIM0: q, k with head dim 0 are refused by the torch op, the reference and sparse.attend
# ---------------------------------------------------------------------------------------------
def test_HEADDIM0_is_an_input_error_everywhere():
    q, k, v = (torch.randn(1, 2, 8, n, dtype=torch.float64) for n in (0, 0, 4))
    for fn in (attngen.compile(SCALED, backend="torch"), attngen.reference(SCALED),
               attngen.compile(BASE, backend="torch"), attngen.reference(BASE)):
        with pytest.raises(InputError):
            fn(q, k, v)
    from attngen.approx.topk_sparse import attend
    plan = pipeline.plan(attngen.load_spec("softmax"))
    with pytest.raises(InputError, match="head dim"):
        attend(plan, q, k, v, torch.zeros(1, 2, 1, 1, dtype=torch.int64))
    with pytest.raises(InputError):
        default_parameters(attngen.load_spec(SCALED), 2, head_dim=0)


# ---------------------------------------------------------------------------------------------
# DUPLICATES: duplicate YAML keys and duplicate parameter names are refused
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "name: a\nname: b\nsimilarity: dot(q, k)\n",
    "name: a\nsimilarity: dot(q, k)\nconstants: {M: 1, M: 2}\n",
    "name: a\nsimilarity: dot(q, k)\nparameters:\n  m: 0.5\n  m: 0.7\n",
    "name: a\nsimilarity: {causal: dot(q, k), causal: dot(q, q)}\n",
], ids=["top-level", "constants", "parameters", "mode-mapping"])
def test_DUPLICATES_yaml_keys_are_refused(text):
    msg = refused(text, "duplicate key")
    assert "line" in msg and "column" in msg


def test_DUPLICATES_parameter_names_in_a_list_are_refused():
    refused({**BASE, "parameters": [{"name": "m", "init": 0.5}, {"name": "m", "init": 0.7}]}, "declared twice")


# ---------------------------------------------------------------------------------------------
# HANG: what made load_spec or plan run for minutes, or without bound
# ---------------------------------------------------------------------------------------------
def test_HANG_exp_tower_is_refused_quickly():
    refused({**BASE, "reweight": "exp(exp(exp(exp(exp(exp(exp(exp(1))))))))"}, "beyond float64")
    refused({**BASE, "constants": {"c": "n - n + 1"}, "reweight": "exp(exp(exp(exp(exp(c)))))"}, "beyond float64")


@pytest.mark.parametrize("start", ["n_q", "2", "1 + 1e-9"])
def test_HANG_constant_chains_are_bounded(start):
    chain = {f"c{n}": f"c{n - 1}*(c{n - 1} + 1)" if n else start for n in range(40)}
    refused({**BASE, "constants": chain, "reweight": "c39"})
    linear = {f"c{n}": f"c{n - 1} + 1" if n else "n_q" for n in range(60)}
    refused({**BASE, "constants": linear, "reweight": "c59"}, "chain of")


ALIAS_BOMB = ("name: t\nsimilarity: exp(dot(q, k))\nnormalize: rowsum\napprox:\n  kind: topk_sparse\n  k: 1\n"
              "  estimator:\n    name: e\n    similarity:\n      causal: dot(relu(q), relu(k))\n"
              "      bidirectional: &a0 [x, x, x, x, x, x, x, x]\n"
              + "".join(f"    x{n}: &a{n} [*a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}]\n"
                        for n in range(1, 9)))


def test_HANG_yaml_aliases_and_anchors_are_refused():
    refused(ALIAS_BOMB, "anchors")
    refused("name: t\nsimilarity: &s dot(q, k)\n", "anchors")
    refused("name: t\nbase: [1]\nsimilarity: *s\n", "invalid YAML")


def test_HANG_shared_references_in_an_unused_branch_are_bounded():
    node = ["x"] * 8
    for _ in range(12):
        node = [node] * 8  # shared: 8**13 leaves, tiny in memory
    estimator = {"similarity": {"causal": "dot(relu(q), relu(k))", "bidirectional": node}}
    spec = {**BASE, "similarity": "exp(dot(q, k))", "normalize": "rowsum",
            "approx": {"kind": "topk_sparse", "k": 1, "estimator": estimator}}
    refused(spec, "approx")


def test_HANG_long_lists_in_an_unused_branch_are_refused_before_they_are_walked():
    estimator = {"similarity": {"causal": "dot(relu(q), relu(k))", "bidirectional": [0] * 2_000_000}}
    spec = {**BASE, "similarity": "exp(dot(q, k))", "normalize": "rowsum",
            "approx": {"kind": "topk_sparse", "k": 1, "estimator": estimator}}
    refused(spec, "approx", seconds=0.5)


def test_HANG_size_caps_leave_a_loaded_spec_reloadable():
    spec = attngen.load_spec({**BASE, "description": "x" * (MAX_SPEC_BYTES - 10), "constants": {"c": 2}})
    assert attngen.load_spec(spec) == spec  # its YAML is a little longer than the cap: a Spec is not capped


def test_HANG_spec_size_is_capped(tmp_path):
    big = "name: t\nsimilarity: dot(q, k)\ndescription: " + "x" * (50 << 20) + "\n"
    refused(big, f"at most {MAX_SPEC_BYTES}")
    path = tmp_path / "big.yaml"
    path.write_text(big)
    refused(path, f"at most {MAX_SPEC_BYTES}")
    refused({**BASE, "constants": {f"c{n}": n for n in range(1000)}}, "at most")
    refused({**BASE, "parameters": [{"name": f"p{n}", "init": 1} for n in range(1000)]}, "at most")
    refused("name: t\nsimilarity: dot(q, k)\ndescription: [" + "1, " * 5000 + "1]\n", "list of")


def test_HANG_devices_fifos_and_directories_are_not_read(tmp_path):
    refused(Path("/dev/zero"), "not a regular file")
    refused("/dev/zero", "no spec file or built-in spec named")  # a plain string is not a path
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    refused(str(link), "not a regular file")
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")
    refused(str(fifo), "not a regular file")
    refused(tmp_path, "not a regular file")


# ---------------------------------------------------------------------------------------------
# The property: generated adversarial specs load and plan, or are refused, quickly, writing nothing
# ---------------------------------------------------------------------------------------------
EXAMPLES = int(os.environ.get("ATTNGEN_ADVERSARIAL_EXAMPLES", "300"))  # ~25 s for both on 2 cores
PROPERTY = settings(max_examples=EXAMPLES, deadline=5000, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
LIMIT_S = 5.0
ALARM_S = 20
NUMBERS = ["0", "1", "2", "0.5", "1e-12", "1e30", "1e-30", "1e308", "1e-308", "1e400", "9" * 40, "10**64",
           "2**-64", "1e30*1e30*1e30*1e30*1e30*1e30*1e30*1e30*1e30*1e30*1e30", "10**64*10**64*10**64*10**64*10**64",
           "9**9**9**9", "exp(exp(exp(exp(1))))", "1e-30*1e-30*1e-30*1e-30*1e-30*1e-30*1e-30*1e-30*1e-30*1e-30*1e-30"]
ODD_NAMES = ["α", "ｄ", "i\u0301", "x" * 300, "undeclared"]
VECTORS = ["q", "k", "relu(q)", "relu(k)", "elu(q) + 1", "exp(k)", "q / norm(q)", "sin(q)", "q * d"]
FUNCTIONS = ["relu", "elu", "sigmoid", "exp", "log", "tanh", "abs", "sqrt", "sin", "cos"]
# the names each key may use (and a few it may not, or that do not exist)
SCOPES = {
    "similarity": ["n", "n_q", "n_k", "d", "h", "H", "pi", "c0", "c1", "c2", "m"],
    "reweight": ["i", "j", "i - j", "abs(i - j)", "n", "n_q", "d", "h", "H", "pi", "c0", "c1", "c2", "m"],
    "constant": ["n", "n_q", "n_k", "d", "h", "H", "pi"],
    "init": ["h", "H", "d", "pi"],
}


def expressions(scope="similarity", max_leaves=10):
    """Expression text from the grammar, using mostly the names of ``scope``: random trees (deep or wide),
    towers of one function, chains of **, and hostile numbers and names."""
    names = st.sampled_from(SCOPES[scope]) | st.sampled_from(ODD_NAMES)
    numbers = (st.sampled_from(NUMBERS) | st.floats(allow_nan=False, allow_infinity=False).map(repr)
               | st.integers(-10 ** 40, 10 ** 40).map(str) | st.integers(-9, 9).map(str))
    leaf = st.sampled_from(SCOPES[scope]) | names | numbers
    if scope == "similarity":
        dots = st.sampled_from(VECTORS).flatmap(lambda a: st.sampled_from(VECTORS).map(lambda b: f"dot({a}, {b})"))
        leaf = leaf | dots | dots

    def extend(inner):
        return (st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "**"]), inner).map(
                    lambda t: f"({t[0]}) {t[1]} ({t[2]})")
                | st.tuples(st.sampled_from(FUNCTIONS), inner).map(lambda t: f"{t[0]}({t[1]})")
                | st.tuples(st.sampled_from(["min", "max"]), inner, inner).map(lambda t: f"{t[0]}({t[1]}, {t[2]})")
                | st.tuples(inner, st.integers(1, 80)).map(lambda t: f"({t[0]})**{t[1]}")
                | st.tuples(inner, st.integers(2, 12)).map(lambda t: "(" + " + ".join([t[0]] * t[1]) + ")"))
    tree = st.recursive(leaf, extend, max_leaves=max_leaves)
    towers = st.tuples(st.sampled_from(["exp", "sin", "log", "tanh", "sqrt", "relu", "-"]),
                       st.integers(1, 8) | st.integers(1, 45),
                       tree).map(lambda t: f"{t[0]}(" * t[1] + t[2] + ")" * t[1])
    powers = st.lists(st.sampled_from(["2", "9", "1.5", "n", "0.5", "10", "(1 + d)", "c0"]
                                      + (["dot(q, k)"] if scope == "similarity" else [])),
                      min_size=2, max_size=6).map("**".join)
    return tree | tree | tree | towers | powers


NAMES = (st.sampled_from(["t", "x" * MAX_NAME, "x" * (MAX_NAME + 1), "x" * 300, "t\n", "tä", "ｔ", "_t", "dot", "q",
                          ""]) | st.text(max_size=12))


@st.composite
def specs(draw):
    """A spec mapping: random expressions at every key, a chain of constants, parameters with inits."""
    n_constants = draw(st.integers(0, 3))
    constants = {}
    for n in range(n_constants):
        if draw(st.booleans()) and n:
            constants[f"c{n}"] = draw(st.sampled_from([f"c{n - 1}*(c{n - 1} + 1)", f"c{n - 1}**2", f"exp(c{n - 1})",
                                                       f"c{n - 1} * 1e20", f"c{n - 1} - n + 1", f"(c{n - 1})**64"]))
        else:
            constants[f"c{n}"] = draw(expressions("constant", 6))
    name = draw(st.sampled_from(["t", "t", "t", "other"]))  # mostly a valid name, so the expressions are reached
    spec = {"name": draw(NAMES) if name == "other" else name, "similarity": draw(expressions()),
            "constants": constants}
    if draw(st.sampled_from([True, True, True, False])):
        spec["reweight"] = draw(expressions("reweight"))
    if draw(st.booleans()):
        spec["parameters"] = {"m": {"shape": draw(st.sampled_from([[], ["H"]])), "init": draw(expressions("init", 6))}}
    if draw(st.booleans()):
        spec["normalize"] = draw(st.sampled_from(["none", "rowsum", "softmax"]))
    spec["causal"] = draw(st.booleans())
    return spec


def long_chain(n):
    return {**BASE, "constants": {f"c{k}": f"c{k - 1}*(c{k - 1} + 1)" if k else "n_q" for k in range(n)},
            "reweight": f"c{n - 1}"}


@st.composite
def yaml_texts(draw):
    """A spec as YAML text, mutated: duplicate keys, anchors and aliases, long names, padding."""
    text = yaml.safe_dump(draw(specs()), sort_keys=False, allow_unicode=True)
    mutation = draw(st.sampled_from(["none", "duplicate", "alias", "anchor-only", "pad", "tab"]))
    if mutation == "duplicate":
        text += text.splitlines()[0] + "\n"
    elif mutation == "alias":
        text = text.replace("similarity:", "similarity: &s", 1) + "description: *s\n"
    elif mutation == "anchor-only":
        text = text.replace("name:", "name: &n", 1)
    elif mutation == "pad":
        text += "description: " + "x" * draw(st.sampled_from([10, MAX_SPEC_BYTES])) + "\n"
    elif mutation == "tab":
        text = text.replace("  ", "\t", 1)
    return text


ALLOWED = (SpecError, PlanError, InputError)


def load_and_plan(source):
    """load_spec then pipeline.plan under a hard alarm in an empty temporary cwd: each takes < LIMIT_S and
    raises nothing but ALLOWED, and no file appears."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)
        try:
            with alarm(ALARM_S):
                start = time.perf_counter()
                try:
                    spec = attngen.load_spec(source)
                except ALLOWED as exc:
                    spec = None
                    event(f"refused at load: {getattr(exc, 'key', None) or type(exc).__name__}")
                assert time.perf_counter() - start < LIMIT_S, f"load_spec took {time.perf_counter() - start:.1f} s"
                if spec is not None:
                    start = time.perf_counter()
                    try:
                        event(f"planned: {pipeline.plan(spec).choice.describe()[:30]}")
                    except ALLOWED as exc:
                        event(f"refused by plan: {type(exc).__name__}")
                    assert time.perf_counter() - start < LIMIT_S, f"plan took {time.perf_counter() - start:.1f} s"
            assert os.listdir(cwd) == [], os.listdir(cwd)
        finally:
            os.chdir(here)
    return spec


@PROPERTY
@given(spec=specs())
@example(spec={**BASE, "reweight": "exp(exp(exp(exp(exp(exp(exp(exp(1))))))))"})
@example(spec={**BASE, "constants": {"c3": 4096}, "similarity": "dot(q, k)**c3"})
@example(spec={**BASE, "similarity": "(dot(q, k)**8)**8"})
@example(spec={**BASE, "constants": {"c": "1e308*10"}, "reweight": "c"})
@example(spec=long_chain(40))
@example(spec={**BASE, "constants": {"c0": "relu(pi)"}, "similarity": "(dot(q, k)**c0)**2", "reweight": "c0"})
@example(spec={**BASE, "constants": {"c0": "n"}, "reweight": "exp(" * 17 + "min(i, sqrt(c0))" + ")" * 17})
@example(spec={**BASE, "constants": {"c0": "n"}, "reweight": "tanh(" * 10 + "min(i, sqrt(c0))" + ")" * 10})
@example(spec={**BASE, "name": "x" * 300})
@example(spec={"name": "t", "similarity": "exp(min(n, c0))", "constants": {"c0": "(relu(sigmoid(1)))**1"},
               "reweight": "i", "causal": False})  # Min(n, Relu(number)) was sympy's "not comparable" ValueError
@example(spec={**BASE, "reweight": "cos(i + j + n_q*i + n_k*j + d*i)*sin(h*j + H*i + i*j + i**2)"})
def test_generated_specs_load_and_plan_or_are_refused_quickly(spec):
    load_and_plan(spec)


@PROPERTY
@given(text=yaml_texts())
@example(text=ALIAS_BOMB)
@example(text="name: a\nname: b\nsimilarity: dot(q, k)\n")
def test_generated_yaml_texts_load_and_plan_or_are_refused_quickly(text):
    load_and_plan(text)


def test_property_helper_fails_on_a_hang(monkeypatch):
    # the guard itself: a load that sleeps past the alarm fails the example instead of blocking
    monkeypatch.setattr(attngen, "load_spec", lambda source: time.sleep(60))
    global ALARM_S
    saved, ALARM_S = ALARM_S, 1
    try:
        with pytest.raises(TimeoutError):
            load_and_plan(BASE)
    finally:
        ALARM_S = saved
    assert math.isfinite(LIMIT_S)

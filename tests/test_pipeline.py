"""attngen.pipeline: the three pass lists, the two entry points, the trace, and that nothing else lowers."""
import ast
from pathlib import Path

import pytest
from click.testing import CliRunner

import attngen
from attngen import pipeline
from attngen.cli import main
from attngen.ir import Ordering

PACKAGE = Path(attngen.__file__).resolve().parent


def test_pass_lists_are_named_and_ordered():
    names = [[p.__name__ for p in stage] for stage in (pipeline.FRONTEND, pipeline.PLANNING, pipeline.LOWERING)]
    assert names == [["check_names", "read_spec", "substitute_constants", "softmax_as_exp"],
                     ["separate", "classify", "linear_terms", "approximate", "costs", "window", "token_inputs",
                      "choose_ordering", "delegate", "capabilities"],
                     ["select_kernels", "fill_slots", "render_text"]]


@pytest.mark.parametrize("name", ["cosformer", "softmax", "retention"])
def test_trace_lists_every_pass_of_the_three_stages(name):
    plan = pipeline.plan(name, target="triton")
    rows = pipeline.trace(plan)
    stages = [stage for stage, _, _ in rows]
    assert stages == sorted(stages, key=["frontend", "planning", "lowering"].index)
    ran = {p for _, p, _ in rows}
    for p in (*pipeline.FRONTEND, *pipeline.PLANNING, *pipeline.LOWERING):
        assert p.__name__ in ran
    assert rows[-1][1] == "render_text" and "lines" in rows[-1][2]


def test_trace_says_why_a_plan_has_no_module():
    toe = attngen.load_spec({"name": "toe", "similarity": "dot(q, k)", "reweight": "1/(1 + abs(i - j))"})
    rows = pipeline.trace(pipeline.plan(toe))  # torch chooses fft above the crossover: no Triton module
    assert rows[-1][:2] == ("lowering", "select_kernels") and "no Triton module" in rows[-1][2]


def test_lower_equals_the_generated_module_and_refuses_plans_without_kernels():
    text = pipeline.lower(pipeline.plan("linear_elu", target="triton"))
    assert text == (PACKAGE.parent / "generated" / "linear_elu_causal.py").read_text()
    with pytest.raises(attngen.PlanError, match="generates the linear and quadratic"):
        pipeline.lower(pipeline.plan(attngen.load_spec("retention"), force="recurrent"))


def test_forced_and_target_plans():
    assert pipeline.plan("polynomial2", force="linear").choice.ordering_for(10) is Ordering.LINEAR
    with pytest.raises(attngen.PlanError, match="target="):
        pipeline.plan("softmax", target="cuda")


def _importers(names: set) -> dict:
    """module path -> the names of ``names`` it imports from attngen.codegen.*."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attngen.codegen"):
                hit = {a.name for a in node.names} & names
                if hit:
                    out.setdefault(path.relative_to(PACKAGE).as_posix(), set()).update(hit)
    return out


def test_nothing_else_calls_the_renderer():
    """Only the lowering passes render (codegen/module.py), and only the pipeline runs the lowering passes."""
    assert set(_importers({"render", "environment"})) <= {"codegen/module.py"}
    assert set(_importers({"select_kernels", "fill_slots", "render_text", "Module"})) == {"pipeline.py"}


def test_cli_plan_trace_and_dot(tmp_path):
    dot = tmp_path / "g.dot"
    result = CliRunner().invoke(main, ["plan", "cosformer", "--target", "triton", "--trace", "--dot", str(dot)])
    assert result.exit_code == 0, result.output
    for needle in ("pipeline trace:", "frontend  read_spec", "planning  capabilities", "lowering  render_text",
                   "triton kernels: linear, quadratic"):
        assert needle in result.output
    assert dot.read_text().startswith("strict digraph cosformer")


@pytest.mark.parametrize("name", ["v", "layout", "S", "z", "pos", "state", "return_state", "q_t", "host", "MODULE",
                                  "torch", "crossover"])
def test_parameter_names_that_clash_in_generated_code_are_refused(name):
    """S3: a parameter named like an argument of the op or of a generated function (or a module global) would
    shadow it (SyntaxError / TypeError at call time, or a wrong value); it is refused when the op is planned."""
    spec = attngen.load_spec({"name": "p", "similarity": "dot(elu(q) + 1, elu(k) + 1)",
                              "reweight": f"(j + 1)**(-sigmoid({name}))",
                              "parameters": {name: {"shape": [], "init": 0.3}}})
    with pytest.raises(attngen.SpecError, match=f"parameter name '{name}' clashes"):
        pipeline.plan(spec)
    with pytest.raises(attngen.SpecError, match="clashes"):
        attngen.compile(spec)


@pytest.mark.parametrize("name", ["heads", "B", "T", "K", "kv", "lambda_"])
def test_parameters_named_like_shape_variables_verify_on_both_backends(name):
    """S2, S3: parameters named like the host's shape variables (heads, B, T, K) or like kernel arguments run
    and decode correctly on both backends (the generated code keeps them in their own namespace)."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from attngen.verify import verify_case, verify_step
    spec = attngen.load_spec({"name": "p", "similarity": "dot(elu(q) + 1, elu(k) + 1)",
                              "reweight": f"(j + 1)**(-sigmoid({name}))",
                              "parameters": {name: {"shape": [], "init": 0.3}}})
    for backend in ("torch", "triton"):
        op = attngen.compile(spec, backend=backend, plan="linear")
        assert verify_case(op, spec, dtype=torch.float32, t=20, dk=16).passed
        assert verify_step(op, spec, dtype=torch.float32, t=20, dk=16).passed

"""Feature maps fused into the Triton kernels (attngen/codegen/features.py): number ([] / [H]) and vector ([Dk] /
[H, Dk]) parameters inside the element formulas of a dot of q and k, read in-kernel with their gradients reduced
there, and row reductions (mean, sum, norm, dot of one side) inside those formulas, nested too, chained in the
backward; instead of the feature prologue (attngen/passes/prologue.py), which keeps what the kernels still cannot
form (matmul, softmax).

Each generated module is checked by attngen.verify against the float64 naive reference on the output and every
gradient, the parameters' included, through each kernel path (the fused and the chunk-parallel causal scans, the
bidirectional linear kernels, the decay scans, the quadratic tiles, the decode step)."""
import os

import pytest
import torch

import attngen
from attngen import pipeline
from attngen.verify import compile_op, verify_case

triton = pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot be tested")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

ROWSUM = {"kind": "rowsum", "eps": 1e-6}
SPECS = {
    # a learnable temperature per head inside elu(.) + 1
    "temperature": {"name": "temperature", "similarity": "dot(elu(q * t) + 1, elu(k * t) + 1)", "normalize": ROWSUM,
                    "parameters": {"t": {"shape": ["H"], "init": 0.5}}},
    # a per-dimension affine map: a vector shared by the heads and one per head
    "affine": {"name": "affine", "similarity": "dot(elu(g * q + b) + 1, elu(g * k + b) + 1)", "normalize": ROWSUM,
               "parameters": {"g": {"shape": ["Dk"], "init": 1}, "b": {"shape": ["H", "Dk"], "init": 0.1}}},
    # a tensor square (width d**2) of parameterised factors
    "square": {"name": "square", "similarity": "dot(g * q + b, g * k + b)**2", "normalize": ROWSUM,
               "parameters": {"g": {"shape": ["H", "Dk"], "init": 1}, "b": {"shape": ["Dk"], "init": 0.5}}},
    # a parameter in a row scale (outside its norm), and a decay reweighting with parameterised features
    "scale": {"name": "scale", "similarity": "dot(q, k) / (t * norm(q) + 1)", "normalize": {"kind": "none"},
              "parameters": {"t": {"shape": ["H"], "init": 1}}},
    "decay": {"name": "decay", "similarity": "dot(elu(q * t) + 1, g * k)", "reweight": "gamma**(i - j)",
              "normalize": {"kind": "none"}, "constants": {"gamma": 0.9},
              "parameters": {"t": {"shape": [], "init": 0.5}, "g": {"shape": ["Dk"], "init": 1}}},
    # row reductions inside the element formulas: nested (layer norm), with parameters, one-sided dots and sums
    "center": {"name": "center", "similarity": "dot(q - mean(q), k - mean(k)) / 4", "normalize": {"kind": "none"}},
    "unit": {"name": "unit", "similarity": "dot(g * q / norm(g * q), k / norm(k))**2", "normalize": ROWSUM,
             "parameters": {"g": {"shape": ["H", "Dk"], "init": 1}}},
    "sums": {"name": "sums", "similarity": "dot(relu(q) / (1 + sum(relu(q * t))), k / sqrt(dot(k, k) + t))",
             "normalize": {"kind": "none"}, "parameters": {"t": {"shape": [], "init": 1}}},
    # row scales outside the dot: a mean, a norm with a vector parameter
    "mean_scale": {"name": "mean_scale", "similarity": "dot(q, k) / (1 + mean(q)**2)", "normalize": {"kind": "none"}},
    "norm_scale": {"name": "norm_scale", "similarity": "dot(q, k) / norm(g * q)", "normalize": {"kind": "none"},
                   "parameters": {"g": {"shape": ["Dk"], "init": 1}}},
    # rotary positions applied before the fused feature map
    "rotary": {"name": "rotary", "similarity": "dot(elu(g * q) + 1, elu(g * k) + 1)", "rotary": True,
               "normalize": ROWSUM, "parameters": {"g": {"shape": ["H", "Dk"], "init": 1}}},
}
DESCRIBED = {"temperature", "affine", "square", "decay", "unit", "sums", "rotary"}  # maps inside the dots


def load(key, causal=True):
    return attngen.load_spec({**SPECS[key], "causal": causal})


@pytest.mark.parametrize("key", sorted(SPECS))
def test_fused_plans_have_no_prologue_and_say_so(key):
    spec = load(key)
    plan = pipeline.plan(spec, target="triton")
    assert plan.prologue is None
    source = pipeline.lower(plan)
    assert "Feature prologue" not in source
    names = sorted(p.name for p in spec.parameters)
    if key in DESCRIBED:  # (the others' parameters and reductions are in row scales outside the dots)
        assert plan.fused.startswith("feature maps fused into the kernels") and "fused:" in plan.explain()
        assert "# Fused feature maps" in source
        if names:
            assert f"parameters {', '.join(names)} read in-kernel" in plan.fused
    for p in names:  # each parameter's gradient is reduced in the kernels
        assert f"b_dpar_{p} += " in source and f"tl.store(dpar_{p}" in source


@pytest.mark.parametrize("causal", [True, False])
def test_rebased_runs_without_a_prologue(causal):
    """ReBased's layer norm (mean, nested mean) and its affine map (gamma, beta [Dk]) are fused."""
    spec = attngen.load_spec("rebased", causal=causal)
    plan = pipeline.plan(spec, target="triton")
    assert plan.prologue is None and "mean(q)" in plan.fused and "parameters beta, gamma" in plan.fused
    source = pipeline.lower(plan)
    assert "/ f_d" in source and "b_qc" in source and "b_dpar_gamma += " in source  # means, chained adjoints


def test_computed_features_keep_fp32_operands_for_half_inputs(monkeypatch):
    """A module whose feature maps are computed in the kernels never rounds them to half for a tl.dot: ReBased in
    fp16, causal, 63 tokens (the first rows' gradients are dominated by the row sum's eps) lost 5x the accuracy of
    the same-dtype reference with fp16 operands."""
    plan = pipeline.plan("rebased", target="triton")
    source = pipeline.lower(plan)
    assert "fp32_features=True" in source and "DT = tl.float32" in source and "DT = q.dtype" not in source
    assert "fp32_features" not in pipeline.lower(pipeline.plan("based", target="triton"))  # raw q, k: half operands
    check(attngen.load_spec("rebased"), "quadratic", "auto", 63, torch.float16, monkeypatch)


def test_what_the_kernels_cannot_form_keeps_the_prologue():
    # (matmul feature maps the linear kernels form themselves: tests/test_fused_matmul.py)
    for similarity in ("dot(softmax(g * q), k)", "dot(q, k) / norm(q - g * k)", "dot(q, k) * mean(q * k)"):
        spec = attngen.load_spec({"name": "x", "similarity": similarity, "constants": {"F": 16},
                                  "parameters": {"g": {"shape": ["Dk"], "init": 1},
                                                 "W": {"shape": ["F", "Dk"], "init": "eye"}}})
        try:
            plan = pipeline.plan(spec, target="triton")
        except attngen.PlanError as exc:  # a prologue the split refuses: never a silently fused plan
            assert "use backend='torch'" in str(exc)
            continue
        assert plan.prologue is not None and not plan.fused


def check(spec, force, scan, t, dtype=torch.float32, monkeypatch=None):
    from attngen.runtime.triton import host

    monkeypatch.setattr(host, "SCAN", scan)
    op = compile_op(spec, backend="triton", plan=force)
    r = verify_case(op, spec, dtype=dtype, t=t, seed=t, device=DEVICE)
    assert r.ordering == force, r.ordering
    assert {f"d{p.name}" for p in spec.parameters if p.learnable} <= set(r.errors)  # every parameter compared
    assert r.passed, (spec.name, force, scan, t, r.errors)


@pytest.mark.parametrize("key,causal,force,scan", [
    ("temperature", True, "linear", "fused"), ("temperature", True, "linear", "parallel"),
    ("temperature", True, "quadratic", "auto"), ("affine", True, "linear", "parallel"),
    ("affine", False, "linear", "auto"), ("affine", False, "quadratic", "auto"),
    ("square", True, "linear", "auto"), ("square", False, "quadratic", "auto"),
    ("scale", True, "linear", "fused"), ("decay", True, "linear", "auto"),
    ("center", True, "linear", "parallel"), ("center", False, "quadratic", "auto"),
    ("unit", False, "linear", "auto"), ("unit", True, "quadratic", "auto"), ("sums", True, "quadratic", "auto"),
    ("mean_scale", True, "linear", "fused"), ("norm_scale", False, "linear", "auto"),
    ("norm_scale", False, "quadratic", "auto"), ("rotary", True, "linear", "auto"),
    ("rotary", True, "quadratic", "auto"),
])
def test_fused_parameters_fwd_and_every_gradient(key, causal, force, scan, monkeypatch):
    check(load(key, causal), force, scan, 70, monkeypatch=monkeypatch)


def test_fused_parameters_in_half_precision(monkeypatch):
    check(load("affine"), "linear", "fused", 40, torch.float16, monkeypatch)


def test_decode_steps_with_fused_parameters():
    from attngen.verify import verify_step

    spec = load("affine")
    r = verify_step(compile_op(spec, backend="triton"), spec, t=20, device=DEVICE)
    assert r.passed, r.errors


def test_grouped_kv_heads_with_per_head_key_features():
    """k, v with fewer heads than q: the key side's per-head parameters are read per query head."""
    spec = load("affine")
    op, ref = compile_op(spec, backend="triton"), compile_op(spec, backend="torch")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 30, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 30, 16, generator=g, dtype=torch.float64) for _ in range(2))
    params = {"g": 1 + 0.3 * torch.randn(16, generator=g, dtype=torch.float64),
              "b": 0.3 * torch.randn(4, 16, generator=g, dtype=torch.float64)}
    do = torch.randn(1, 4, 30, 16, generator=g, dtype=torch.float64)
    results = []
    for f, dtype, device in ((op, torch.float32, DEVICE), (ref, torch.float64, "cpu")):
        leaves = [x.to(dtype=dtype, device=device).requires_grad_() for x in (q, k, v, *params.values())]
        o = f(*leaves[:3], **dict(zip(params, leaves[3:])))
        grads = torch.autograd.grad((o * do.to(dtype=dtype, device=device)).sum(), leaves)
        results.append([x.detach().cpu().double() for x in (o, *grads)])
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg", "db"], *results):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)

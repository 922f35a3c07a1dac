"""Verification of approximations: against the naive reference of what they compute given the op's own
discrete decisions (topk_sparse: the kept blocks; conv_basis: the recovered starts), and the checks that
this reference is itself right and can fail."""
import dataclasses

import pytest
import torch

import attngen
from attngen.verify import approximation_reference, rebuilt_scores, rel_rms, verify_case

SOFTMAX = {"name": "sm", "similarity": "exp(dot(q, k)/sqrt(d))", "normalize": "rowsum"}
SPARSE = {"kind": "topk_sparse", "estimator": "cosformer", "k": 1, "block": 16}
CONV = {"kind": "conv_basis", "k": 3, "probe": 4}


def spec_of(approx, causal=True):
    return attngen.load_spec({**SOFTMAX, "causal": causal, "approx": approx})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_topk_sparse_verifies_and_reports_its_error_against_exact(causal, dtype):
    spec = spec_of(SPARSE, causal)
    res = verify_case(attngen.compile(spec, backend="torch"), spec, dtype=dtype, t=80, dk=16)
    assert res.ordering == "topk_sparse" and res.passed, res.errors
    assert res.exact_error > 1e-2  # k = 1 of 5 key blocks: far from exact softmax, and reported as such


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_conv_basis_verifies_with_its_gradients(dtype):
    spec = spec_of(CONV)
    res = verify_case(attngen.compile(spec, backend="torch"), spec, dtype=dtype, t=63, dk=16)
    assert res.ordering == "conv_basis" and res.passed, res.errors
    assert res.exact_error > 1e-2


def test_the_sparse_reference_catches_a_wrong_selection():
    spec = spec_of(SPARSE)
    op = attngen.compile(spec, backend="torch")
    q, k, v = (torch.randn(1, 2, 80, 16, dtype=torch.float64) for _ in range(3))
    out = op(q, k, v)
    assert rel_rms(out, approximation_reference(op, spec)(q, k, v)) < 1e-12
    sel = op.last_selection
    kv = sel.kv_blocks.clone()
    last = (sel.counts - 1).clamp_min(0).unsqueeze(-1)
    kv.scatter_(-1, last, -1)  # drop each query block's last kept block
    op.last_selection = dataclasses.replace(sel, kv_blocks=kv, counts=(sel.counts - 1).clamp_min(0))
    assert rel_rms(out, approximation_reference(op, spec)(q, k, v)) > 1e-3


def test_the_conv_basis_reference_catches_wrong_starts():
    spec = spec_of(CONV)
    op = attngen.compile(spec, backend="torch")
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64) for _ in range(3))
    out = op(q, k, v)
    assert rel_rms(out, approximation_reference(op, spec)(q, k, v)) < 1e-12
    basis = op.last_basis
    op.last_basis = dataclasses.replace(basis, starts=torch.where(basis.starts > 0, basis.starts + 1, basis.starts))
    assert rel_rms(out, approximation_reference(op, spec)(q, k, v)) > 1e-3


def test_rebuilt_scores_are_the_scores_when_every_column_starts_an_element():
    h = torch.randn(2, 3, 9, 9, dtype=torch.float64).tril()
    starts = torch.arange(9).expand(2, 3, 9)
    assert torch.allclose(rebuilt_scores(h, starts), h, rtol=0, atol=1e-12)  # sums of differences: roundoff


def test_rebuilt_scores_of_a_k_conv_matrix():
    """Two convolutions: h1(i-j) everywhere plus h2(i-j) from column 4: exactly rebuilt from starts [0, 4]."""
    t = 10
    lag = torch.arange(t).view(t, 1) - torch.arange(t).view(1, t)
    h1, h2 = torch.randn(t, dtype=torch.float64), torch.randn(t, dtype=torch.float64)
    col = torch.arange(t).view(1, t)
    scores = torch.where(lag >= 0, h1[lag.clamp_min(0)] + torch.where(col >= 4, h2[lag.clamp_min(0)], 0.0), 0.0)
    scores = scores.expand(1, 1, t, t)
    assert torch.allclose(rebuilt_scores(scores, torch.tensor([[[0, 4]]])), scores, atol=1e-12)
    assert not torch.allclose(rebuilt_scores(scores, torch.tensor([[[0, 10]]])), scores, atol=1e-3)


def test_cli_verify_passes_an_approximation_and_prints_its_exact_error(tmp_path):
    from click.testing import CliRunner

    from attngen.cli import main
    path = tmp_path / "sm_sparse.yaml"
    path.write_text("name: sm_sparse\nsimilarity: exp(dot(q, k)/sqrt(d))\nnormalize: rowsum\n"
                    "approx: {kind: topk_sparse, estimator: relu_linear, k: 1, block: 16}\n")
    result = CliRunner().invoke(main, ["verify", str(path), "--seq-len", "40", "--dtype", "float64"])
    assert result.exit_code == 0, result.output
    assert "error against the exact reference (not a pass criterion)" in result.output
    assert "2 passed, 0 failed" in result.output

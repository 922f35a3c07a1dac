"""attngen.compile(..., backend="triton"): the generated module behind the public API, its on-disk cache
under concurrent processes, and the backend choice. Runs under the interpreter on CPU."""
import os
import subprocess
import sys

import pytest
import torch

import attngen
from attngen import InputError, PlanError
from attngen.pipeline import plan as build_plan
from attngen.verify import rel_rms

pytest.importorskip("triton", reason="triton is not installed")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("name,causal", [("cosformer", True), ("cottention", False), ("retention", True)],
                         ids=["cosformer-causal", "cottention-bidirectional", "retention-causal"])
def test_triton_backend_matches_torch_backend(name, causal, layout):
    spec = attngen.load_spec(name, causal=causal)
    tri = attngen.compile(spec, backend="triton", layout=layout)
    ref = attngen.compile(spec, backend="torch", plan="linear", layout=layout)
    shape = (1, 70, 2, 32) if layout == "bthd" else (1, 2, 70, 32)
    q, k, v = (torch.randn(shape, device=DEVICE) for _ in range(3))
    assert rel_rms(tri(q, k, v).cpu(), ref(q.cpu(), k.cpu(), v.cpu())) <= 1e-5
    # the planner's choice among the orderings with templates (quadratic below its crossover for some of these)
    want = build_plan(spec, head_dim=32, target="triton").choice.ordering_for(70)
    assert tri.plan.choice.ordering_for(70) is want
    assert "backend implements: linear, quadratic" in tri.plan.explain()


def test_triton_backend_refuses_what_it_cannot_generate():
    with pytest.raises(PlanError, match="mixes elements of q and k"):
        attngen.compile({"name": "mixed", "similarity": "norm(q * k)", "normalize": "none"}, backend="triton")
    with pytest.raises(PlanError, match="not legal"):
        attngen.compile("softmax", backend="triton", plan="linear")


def test_auto_backend_runs_torch_on_cpu_tensors(monkeypatch):
    from attngen.runtime.torch import backend as torch_backend
    calls = []
    real = torch_backend.run
    monkeypatch.setattr(torch_backend, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    attngen.compile("cosformer")(*(torch.randn(1, 1, 5, 16) for _ in range(3)))
    assert calls == [1]


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="need CUDA tensors"):
        attngen.compile("cosformer", backend="triton")(*(torch.randn(1, 1, 5, 16) for _ in range(3)))


_BUILD = """
import sys
from attngen import load_spec
from attngen.runtime.triton import loader as triton_backend
from attngen.pipeline import plan as build_plan
module = triton_backend.load_module(build_plan(load_spec("relu_linear"), target="triton"))
print(module.__file__)
"""


def test_cache_is_safe_under_two_concurrent_processes(tmp_path):
    env = dict(os.environ, ATTNGEN_CACHE_DIR=str(tmp_path / "shared-cache"))
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    from attngen.build import generate
    (path,) = paths
    assert open(path, encoding="utf-8").read() == generate(attngen.load_spec("relu_linear")).source
    leftovers = [p for p in os.listdir(tmp_path / "shared-cache") if p.endswith(".tmp")]
    assert leftovers == []

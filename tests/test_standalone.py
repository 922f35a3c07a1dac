"""`attngen build --standalone`: the generated modules plus their shared host runtime (attngen_host/), which run
where attngen is not installed. Checked in a fresh interpreter whose import of attngen fails."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("triton", reason="triton is not installed; the generated modules cannot run")

from attngen.build import HOST_FILES, HOST_INITS, HOST_PACKAGE, write_host  # noqa: E402
from attngen.cli import main  # noqa: E402

# Run in `python -I` with sys.path[0] = the build folder. A meta-path finder placed first refuses attngen (the
# venv's editable install would otherwise find it); the module must fall back to attngen_host beside it.
_RUN = r'''
import importlib.abc
import sys

sys.path.insert(0, sys.argv[1])


class NoAttngen(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "attngen" or name.startswith("attngen."):
            raise ImportError(f"{name} is blocked: this process checks the module without attngen")
        return None


sys.meta_path.insert(0, NoAttngen())
try:
    import attngen  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("attngen was importable")

import torch

import linear_elu_causal as m

assert m.host.__name__ == "attngen_host.runtime.triton.host", m.host.__name__
assert not any(n == "attngen" or n.startswith("attngen.") for n in sys.modules), sorted(sys.modules)

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 20, 16, generator=g, dtype=torch.float64) for _ in range(3))
xs = [x.float().requires_grad_() for x in (q, k, v)]
o = m.linear_elu_attention(*xs)
o.square().sum().backward()

# o_i = sum_{j <= i} phi(q_i).phi(k_j) v_j / (sum_{j <= i} phi(q_i).phi(k_j) + 1e-6), phi = elu + 1
ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
fq, fk = (torch.nn.functional.elu(x) + 1 for x in ref_in[:2])
a = (fq @ fk.transpose(-1, -2)).tril()
ref = (a @ ref_in[2]) / (a.sum(-1, keepdim=True) + 1e-6)
ref.square().sum().backward()


def rel(x, y):
    return float((x.double() - y).norm() / y.norm())


errors = {"o": rel(o.detach(), ref.detach())}
errors.update({"d" + n: rel(x.grad, y.grad) for n, x, y in zip("qkv", xs, ref_in)})
assert all(e <= 1e-4 for e in errors.values()), errors
try:
    m.linear_elu_attention(xs[0].double(), xs[1].double(), xs[2].double())
except m.host.InputError as exc:
    assert "float64" in str(exc), exc
else:
    raise SystemExit("float64 inputs were accepted")
print("standalone ok", errors)
'''


def test_build_standalone_runs_without_attngen(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", "linear_elu", "--mode", "causal", "--backend", "torch", "--seq-len",
                                       "7", "--out", str(out), "--standalone"])
    assert result.exit_code == 0, result.output
    assert (out / "linear_elu_causal.py").is_file()
    for init in HOST_INITS:
        assert (out / HOST_PACKAGE / init).read_bytes() == b""
    for target in HOST_FILES.values():
        assert (out / HOST_PACKAGE / target).is_file(), target
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-I", "-c", _RUN, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "standalone ok" in proc.stdout


def test_host_files_are_copies_of_attngens(tmp_path):
    """The standalone host is attngen's own files, byte for byte (importlib.resources: a wheel works too)."""
    root = Path(__file__).resolve().parent.parent / "attngen"
    write_host(tmp_path)
    write_host(tmp_path)  # idempotent
    for (package, name), target in HOST_FILES.items():
        source = root.joinpath(*package.split(".")[1:], name)
        assert (tmp_path / HOST_PACKAGE / target).read_bytes() == source.read_bytes()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [f"{HOST_PACKAGE}/{t}" for t in (*HOST_FILES.values(), *HOST_INITS)])

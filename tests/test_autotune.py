"""The host's launch tuning (attngen.runtime.triton.host.Tuned): on a device, every candidate (num_warps,
num_stages) is timed once per key and the fastest kept; the key holds the constexprs and dtypes, not the sequence
length or the batch; a candidate that does not fit is skipped; under the interpreter the host's choice runs."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from triton.runtime.errors import OutOfResources  # noqa: E402

from attngen.runtime.triton import host  # noqa: E402


class FakeKernel:
    """Records launches; ``kernel[grid](*args, **meta)`` like a JIT function."""
    fn = type("fn", (), {"__name__": "_fake_kernel"})

    def __init__(self, too_big=()):
        self.calls, self.too_big = [], set(too_big)

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, **meta):
            if (num_warps, num_stages) in self.too_big:
                raise OutOfResources(300000, 232448, "shared memory")
            self.calls.append((args, meta, num_warps, num_stages))
        return launch


def test_interpreter_and_cpu_run_the_hosts_choice(monkeypatch):
    kernel = FakeKernel()
    tuned = host.Tuned(kernel)
    x = torch.zeros(4)
    tuned[(1,)](x, 128, BT=64, num_warps=8, num_stages=2)
    tuned[(1,)](x, 128, BT=64)  # no hint: Triton's defaults
    assert [(c[2], c[3]) for c in kernel.calls] == [(8, 2), (4, 3)]
    assert tuned.best == {}


def test_tuned_once_per_key_not_per_length(monkeypatch):
    monkeypatch.setattr(host, "AUTOTUNE", True)
    monkeypatch.setattr(host, "_on_device", lambda args: True)
    kernel = FakeKernel(too_big={(8, 3)})
    tuned = host.Tuned(kernel)
    speed = {(4, 2): 3.0, (4, 3): 2.0, (8, 2): 1.0, (8, 3): 0.5}  # (8, 3) would win but does not fit
    timed = []

    def bench(fn):
        fn()
        w, s = kernel.calls[-1][2:]
        timed.append((w, s))
        return speed[(w, s)]

    x = torch.zeros(4)
    for t in (64, 1000, 4096):  # sequence lengths are runtime arguments: tuned once
        tuned.launch((1,), (x, t), dict(BT=64, BV=32, num_warps=4, num_stages=3), bench=bench)
    assert sorted(timed) == [(4, 2), (4, 3), (8, 2)] and kernel.calls[-1][2:] == (8, 2)
    assert list(tuned.best.values()) == [(8, 2)]
    tuned.launch((1,), (x, 64), dict(BT=64, BV=16, num_warps=4, num_stages=3), bench=bench)  # another key
    assert len(tuned.best) == 2 and len(timed) == 6
    tuned.launch((1,), (x.double(), 64), dict(BT=64, BV=16, num_warps=4, num_stages=3), bench=bench)  # a dtype
    assert len(tuned.best) == 3


def test_generated_modules_hold_tuned_kernels():
    from attngen import load_spec
    from attngen.pipeline import plan
    from attngen.runtime.triton import loader
    mod = loader.load_module(plan(load_spec("relu_linear"), target="triton", force="linear"))
    assert isinstance(mod.MODULE.linear.fwd, host.Tuned) and isinstance(mod.MODULE.linear.chunked.o, host.Tuned)

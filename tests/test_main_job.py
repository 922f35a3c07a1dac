"""The main job's verifications as tests: `attngen build --all` runs exactly build_cases(builtin_modules()), so
the main job and the test suite cannot disagree (each case here is one row of the main job's table).

The cases carry the mark `mainjob`, deselected by default (pyproject.toml addopts): the README's first command runs
exactly these cases, and CI runs it before the tests, so the default test run does not verify them twice.
`pytest -m mainjob -n auto` runs them as tests."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from attngen import builtin_specs  # noqa: E402
from attngen.build import builtin_modules  # noqa: E402
from attngen.verify import build_cases, run_case  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = build_cases(builtin_modules())


def test_the_main_job_covers_every_builtin_backend_and_the_decode_step():
    specs = {(c.spec.name, c.spec.mode) for c in CASES}
    assert specs == {(s.name, s.mode) for s in builtin_specs()}
    assert {c.backend for c in CASES} == {"torch", "triton"}
    assert any(c.step and c.backend == "triton" for c in CASES) and any(c.step and c.backend == "torch" for c in CASES)
    assert any(c.plan == "quadratic" for c in CASES) and any(c.plan == "linear" for c in CASES)


@pytest.mark.mainjob
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_main_job_case(case):
    res = run_case(case, device=DEVICE)
    failed = {n: f"{res.errors[n]:.2e} (yardstick {res.ref_errors[n]:.2e}, tol {res.tolerance:.0e})"
              for n in res.errors if not res.quantity_passed(n)}
    assert not failed, failed

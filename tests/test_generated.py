"""generated/ holds `attngen build` of every built-in spec whose plan has Triton templates; a rebuild must give
the same bytes (so a refactor of the compiler that changes no kernel changes no file)."""
from pathlib import Path

import pytest

from attngen.build import builtin_modules

GENERATED = Path(__file__).resolve().parent.parent / "generated"
MODULES = builtin_modules()


@pytest.mark.parametrize("module", [m for m in MODULES if m.source is not None], ids=lambda m: m.filename)
def test_generated_module_is_up_to_date(module):
    path = GENERATED / module.filename
    assert path.is_file(), f"{path} is missing: run `attngen build --all` from the repository root"
    assert path.read_bytes() == module.source.encode(), (
        f"{path} differs from what the compiler renders now: run `attngen build --all` and review the diff")


def test_no_stale_files():
    expected = {m.filename for m in MODULES if m.source is not None}
    present = {p.name for p in GENERATED.glob("*.py")}
    assert present == expected, f"stale or missing files in generated/: {sorted(present ^ expected)}"


def test_separable_builtins_have_modules_and_the_others_say_why():
    by_name = {(m.spec.name, m.spec.mode): m for m in MODULES}
    for name in ("linear_elu", "relu_linear", "cosformer", "cottention", "retention", "polynomial2", "based"):
        for mode in ("causal", "bidirectional"):
            assert by_name[(name, mode)].source is not None, by_name[(name, mode)].reason
    for name in ("softmax", "alibi"):
        m = by_name[(name, "causal")]
        assert m.source is None and "quadratic" in m.reason


def test_rendering_is_deterministic():
    again = {m.filename: m.source for m in builtin_modules()}
    assert again == {m.filename: m.source for m in MODULES}

"""generated/ holds `attngen build` of every built-in spec whose plan has Triton templates (all of them: linear
and quadratic orderings); a rebuild must give the same bytes (so a refactor of the compiler that changes no
kernel changes no file)."""
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


def test_every_builtin_has_a_module_with_the_orderings_its_plan_uses():
    by_name = {(m.spec.name, m.spec.mode): m for m in MODULES}
    for mode in ("causal", "bidirectional"):
        for name in ("linear_elu", "relu_linear", "cosformer", "cottention", "retention", "polynomial2", "based"):
            m = by_name[(name, mode)]
            assert m.source is not None, m.reason
            # linear and quadratic kernels, the dispatch at the crossover, the decode step (causal)
            assert "\nCROSSOVER = " in m.source and "def _quadratic_attention(" in m.source, m.filename
            assert f"def {name}_step(" in m.source
        for name in ("softmax", "alibi"):
            m = by_name[(name, mode)]
            assert m.source is not None, m.reason
            assert "CROSSOVER" not in m.source and "_fwd_kernel(" not in m.source  # the quadratic ordering only
            assert f"def {name}_attention_block_sparse(" in m.source


def test_rendering_is_deterministic():
    again = {m.filename: m.source for m in builtin_modules()}
    assert again == {m.filename: m.source for m in MODULES}

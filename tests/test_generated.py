"""generated/ holds `attngen build` of every built-in spec whose plan has Triton templates (all of them: linear
and quadratic orderings); a rebuild must give the same bytes (so a refactor of the compiler that changes no
kernel changes no file)."""
import ast
from pathlib import Path

import pytest

from attngen.build import builtin_modules
from attngen.codegen.render import template_files

GENERATED = Path(__file__).resolve().parent.parent / "generated"
MODULES = [f for m in builtin_modules() for f in (m.parts or (m,))]  # a spec with terms: its terms' files


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
            assert "\nCROSSOVER = " in m.source and "crossover=CROSSOVER" in m.source, m.filename
            assert "linear=host.Linear(" in m.source and "quadratic=host.Quadratic(" in m.source, m.filename
            assert (f"def {name}_step(" in m.source) == (mode == "causal"), m.filename
        for name in ("softmax", "alibi"):
            m = by_name[(name, mode)]
            assert m.source is not None, m.reason
            assert "CROSSOVER" not in m.source and "_fwd_kernel(" not in m.source  # the quadratic ordering only
            assert f"def {name}_attention_block_sparse(" in m.source


def test_modules_hold_kernels_a_record_and_thin_wrappers_only():
    """The host code is shared (attngen.runtime.triton.host, a Python module, not a template): a module holds
    its header, @triton.jit kernels, the record MODULE and public functions that each make one call into the
    host. So a change to the host regenerates nothing (and changes no template hash)."""
    assert [f.name for f in template_files() if not f.name.endswith(".j2")] == []
    for m in MODULES:
        if m.source is None:
            continue
        tree = ast.parse(m.source)
        public = {f"{m.spec.name}_attention", f"{m.spec.name}_step", f"{m.spec.name}_attention_block_sparse"}
        for node in tree.body:
            kernel = any(ast.unparse(d) == "triton.jit" for d in getattr(node, "decorator_list", ()))
            if isinstance(node, ast.FunctionDef) and not kernel:
                assert node.name in public, f"{m.filename}: {node.name} is host code"
                body = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body  # after the docstring
                assert len(body) == 1 and ast.unparse(body[0]).startswith("return host."), (m.filename, node.name)
        assert "MODULE = host.register(host.Module(" in m.source and "import torch" not in m.source


def test_rendering_is_deterministic():
    again = {f.filename: f.source for m in builtin_modules() for f in (m.parts or (m,))}
    assert again == {m.filename: m.source for m in MODULES}

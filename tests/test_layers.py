"""Guard rails of the structure: imports run one way through the pipeline's stages, there are no import cycles,
no intra-package import hides inside a function (outside the CLI), and the compiler stages run without torch.

The layers, lowest first (a module may import its own layer and those below, never above):

    0 errors, version                 5 pipeline
    1 frontend/ (spec, expr, approx)  6 build, runtime/ (validate, inputs, state, torch/, triton/)
    2 ir                              7 approx/<kind>/
    3 passes/, graph                  8 op (compile, AttentionOp)
    4 codegen/                        9 naive (the reference), distributed (context parallelism)
                                      10 verify, aot, bench, nn (layers), hf (transformers)   11 cli
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attngen"
LAYERS = [  # (module prefix, layer): the longest matching prefix wins
    ("attngen.errors", 0), ("attngen.version", 0),
    ("attngen", 1), ("attngen.frontend", 1),
    ("attngen.ir", 2),
    ("attngen.passes", 3), ("attngen.graph", 3),
    ("attngen.codegen", 4),
    ("attngen.pipeline", 5),
    ("attngen.build", 6), ("attngen.runtime", 6),
    ("attngen.approx", 7),
    ("attngen.op", 8),
    ("attngen.naive", 9), ("attngen.distributed", 9),
    ("attngen.verify", 10), ("attngen.aot", 10), ("attngen.bench", 10), ("attngen.nn", 10), ("attngen.hf", 10),
    ("attngen.cli", 11), ("attngen.__main__", 11),
]
FUNCTION_IMPORTS_ALLOWED = {"attngen.cli"}  # the CLI imports each command's stage on use (fast --help)


def _modules() -> dict:
    """module name -> path, for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list:
    """The package modules an ImportFrom names (relative imports resolved, `from pkg import submodule` too)."""
    if node.level:
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    if not (target == "attngen" or target.startswith("attngen.")):
        return []
    found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return found or [target]


def _imports(module: str, path: Path):
    """(imported module, line, at module level?) for every intra-package import of ``module``."""
    tree = ast.parse(path.read_text(), str(path))
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                if inner is not node:
                    nested.add(id(inner))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            targets = _resolve(module, path, node)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name == "attngen" or a.name.startswith("attngen.")]
        else:
            continue
        for t in targets:
            yield t, node.lineno, id(node) not in nested


def _edges():
    for module, path in MODULES.items():
        for target, line, top in _imports(module, path):
            yield module, target, line, top


def test_every_module_has_a_layer():
    assert "attngen.pipeline" in MODULES and "attngen.runtime.validate" in MODULES
    for module in MODULES:
        layer(module)  # raises ValueError (max of nothing) for a module outside every layer


def test_imports_run_one_way():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)}) at line {line}"
              for m, t, line, _ in _edges() if layer(t) > layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = nx.DiGraph((m, t) for m, t, _, top in _edges() if top and m != t and not t.startswith(m + "."))
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_no_function_level_intra_package_imports():
    hidden = [f"{m}:{line} imports {t} inside a function" for m, t, line, top in _edges()
              if not top and m not in FUNCTION_IMPORTS_ALLOWED]
    assert not hidden, "\n".join(hidden)


def test_the_layer_test_sees_a_violation(tmp_path):
    """The checks above can fail: an upward and a function-level import in a synthetic module are found."""
    path = tmp_path / "ir.py"
    path.write_text("from attngen.op import compile\n\ndef f():\n    from attngen import pipeline\n")
    found = list(_imports("attngen.ir", path))
    assert ("attngen.op", 1, True) in found and ("attngen.pipeline", 4, False) in found
    assert layer("attngen.op") > layer("attngen.ir")


BLOCK_TORCH = textwrap.dedent("""
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "triton"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _NoTorch())
""")


def test_compiler_stages_run_without_torch():
    """attngen.build, the pipeline and rendering a module import neither torch nor triton."""
    code = BLOCK_TORCH + textwrap.dedent("""
        import attngen.build
        from attngen import pipeline
        text = pipeline.lower(pipeline.plan("cosformer", target="triton"))
        assert "@triton.jit" in text
        assert not any(m.split(".")[0] in ("torch", "triton") for m in sys.modules), "torch got imported"
        print("ok", len(text.splitlines()))
    """)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


@pytest.mark.parametrize("name", ["cosformer", "retention", "softmax"])
def test_rendering_is_deterministic_across_processes(name):
    """The same spec gives the same bytes in two processes with different hash seeds (set iteration order)."""
    code = ("import hashlib, sys; from attngen import pipeline; "
            f"sys.stdout.write(hashlib.sha256(pipeline.lower(pipeline.plan({name!r}, target='triton')).encode())"
            ".hexdigest())")
    digests = set()
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.add(out.stdout)
    assert len(digests) == 1

"""`pip install .` (not only editable) ships the built-in specs, the templates and every subpackage."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_specs_templates_and_backends(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this environment")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("attngen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    specs = sorted((ROOT / "attngen" / "specs").glob("*.yaml"))
    templates = sorted((ROOT / "attngen" / "codegen" / "templates").glob("*.j2"))
    assert specs and templates
    for path in specs + templates:
        assert path.relative_to(ROOT).as_posix() in names
    for module in (ROOT / "attngen").rglob("*.py"):
        assert module.relative_to(ROOT).as_posix() in names

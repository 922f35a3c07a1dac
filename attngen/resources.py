"""Where the shipped data lives: the built-in specs and the Jinja templates.

In a source checkout they are the top-level specs/ and templates/ folders; in an installed wheel they
are the folders attngen/_specs and attngen/_templates (pyproject maps the top-level folders there)."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_REPO = _PACKAGE.parent


def _folder(installed: str, repo_dir: str) -> Path:
    local = _REPO / repo_dir
    if local.is_dir() and (_REPO / "pyproject.toml").is_file():
        return local
    return _PACKAGE / installed


def specs_dir() -> Path:
    return _folder("_specs", "specs")


def templates_dir() -> Path:
    return _folder("_templates", "templates")


def spec_files() -> list:
    return sorted(specs_dir().glob("*.yaml"))

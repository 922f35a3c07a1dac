"""Where the shipped data lives: the built-in specs and the Jinja templates.

In a source checkout they are the top-level specs/ and templates/ folders; in an installed wheel they
are the packages attngen._specs and attngen._templates (pyproject maps the folders to them)."""
from __future__ import annotations

from importlib import resources as _res
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _folder(package: str, repo_dir: str) -> Path:
    local = _REPO / repo_dir
    if local.is_dir() and (_REPO / "pyproject.toml").is_file():
        return local
    return Path(str(_res.files(package)))


def specs_dir() -> Path:
    return _folder("attngen._specs", "specs")


def templates_dir() -> Path:
    return _folder("attngen._templates", "templates")


def spec_files() -> list:
    return sorted(specs_dir().glob("*.yaml"))

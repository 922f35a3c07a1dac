"""The renderer: one Jinja environment over the templates shipped in attngen/codegen/templates (loaded with
importlib.resources, so an installed wheel finds them), strict about unknown slots; and the template hash
that generated modules and the module cache carry."""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources

import jinja2

PACKAGE = "attngen.codegen"
FOLDER = "templates"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one Jinja environment (strict: an unknown slot is an error)."""
    return jinja2.Environment(loader=jinja2.PackageLoader(PACKAGE, FOLDER), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def template_files() -> list:
    """The shipped templates (importlib.resources traversables), by name."""
    return sorted((f for f in resources.files(PACKAGE).joinpath(FOLDER).iterdir() if f.name.endswith(".j2")),
                  key=lambda f: f.name)


@lru_cache(maxsize=1)
def template_hash() -> str:
    """A hash of every template's name and bytes: part of a generated module's header and cache key."""
    h = hashlib.sha256()
    for f in template_files():
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def render(template: str, slots: dict) -> str:
    """The text of ``template`` with its slots filled, trailing spaces and the blank lines that macro calls
    leave inside function bodies (and beyond two before top-level code) removed."""
    text = environment().get_template(template).render(**slots)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANKS_AT_TOP.sub("\n\n\n", _BLANK_IN_BODY.sub("\n", text))


# macro calls leave blank lines inside function bodies; a blank line before an indented line goes
_BLANK_IN_BODY = re.compile(r"\n(?:[ \t]*\n)+(?=[ \t]+\S)")
# and at a function's end (a macro with nothing to write): at most two blank lines before top-level code
_BLANKS_AT_TOP = re.compile(r"\n{4,}(?=\S)")

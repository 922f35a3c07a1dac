"""Error types. Every user mistake is a SpecError (or a subclass) with a message that says
what was expected, what was found, where, and how to fix it; the CLI prints it without a traceback."""
from __future__ import annotations


class AttngenError(Exception):
    """Base class of the errors a user can cause; the CLI prints these as one message (exit 2)."""


class SpecError(AttngenError):
    """A spec (YAML file, Python dict, or override) is invalid.

    The message reads ``<where>: <key>: <what> ; expected <expected> ; fix: <fix>``.
    """

    def __init__(self, what: str, *, where: str = "<spec>", key: str | None = None,
                 expected: str | None = None, fix: str | None = None):
        self.what, self.where, self.key, self.expected, self.fix = what, where, key, expected, fix
        parts = [where + (f": {key}" if key else ""), what]
        msg = ": ".join(parts)
        if expected:
            msg += f"; expected {expected}"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)


class PlanError(AttngenError):
    """The planner cannot produce the requested plan (e.g. a forced ordering that is not legal)."""


class InputError(AttngenError, ValueError):
    """A tensor passed to a compiled op has the wrong shape, dtype, device or layout."""


class VerificationError(AttngenError):
    """A compiled op disagrees with the naive reference (the CLI exits 1 for these)."""

"""User-facing errors: one line that says what was wrong and what to do.

The CLI turns a `UserError` into that line on stderr and its exit code; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a missing dependency; `exit_code` is what the CLI returns."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class AdapterError(UserError):
    """An adapter that cannot be read, or that does not fit the model or graph."""


class MissingDependencyError(UserError):
    """An optional dependency (TensorRT, a GPU) is not available."""

    exit_code = 3


def named(kind: str, name: object) -> str:
    """`adapter legal`, but just `adapter` when the name says no more than the kind (a folder named `adapter`):
    messages never read `adapter adapter targets ...`."""
    text = str(name)
    last = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if not text or last.lower() in (kind.lower(), f"{kind.lower()}s"):
        return f"{kind} {text}" if "/" in text.rstrip("/") else kind
    return f"{kind} {text}"

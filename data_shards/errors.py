"""One exception type for bad input, so every stage reports problems the same way.

A user who points the pipeline at a wrong file should read, in one line, which file, which
field inside it, and what was expected instead of what was found.
"""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input: names the file, the field and what was expected."""

    def __init__(self, path: str | Path | None, field: str | None, expected: str, found: object = None):
        self.path = None if path is None else str(path)
        self.field = field
        self.expected = expected
        self.found = found
        where = self.path if self.path is not None else "<input>"
        if field:
            where += f" [{field}]"
        message = f"{where}: expected {expected}"
        if found is not None:
            message += f", found {found}"
        super().__init__(message)

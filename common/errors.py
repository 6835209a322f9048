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


def read_json_file(path: str | Path, expected: str):
    """Parse a JSON file, or raise one InputError saying the file is missing or not JSON."""
    import json

    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, expected, "no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, None, "valid JSON", str(exc)) from exc


def finite_points(xy, path: str | Path | None, field: str):
    """(n, 2) float64 array of finite (x, y) points, or one InputError naming the first bad row."""
    import numpy as np

    points = np.asarray(xy, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise InputError(path, field, "an array of shape (n, 2)", points.shape)
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            path,
            field,
            "finite coordinates for every cell",
            f"{int(bad.sum())} cells with NaN/inf, first at row {first}: {points[first].tolist()}",
        )
    return points

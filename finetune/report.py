"""One report writer for the heads: aligned text tables, ``metrics.json``, figures.

* :func:`finite` — JSON has no NaN: undefined values (NaN, ±inf) become ``null``, recursively;
* :func:`format_table` — rows of numbers as aligned text, one :class:`Column` per column, missing
  values printed as the table chooses ("–", "n/a", or Python's ``nan``);
* :func:`write_metrics` — ``metrics.json`` written atomically with undefined values as ``null``;
* :func:`save_figure` — a matplotlib figure written atomically as PNG and closed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import save_png, write_json


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, through dicts, lists and tuples
    (tuples become lists, as JSON writes them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def is_missing(value: Any) -> bool:
    """None, or a real number (Python or numpy) that is NaN or infinite."""
    return value is None or (isinstance(value, numbers.Real) and not math.isfinite(value))


def number(value: float | None, fmt: str, missing: str = "–") -> str:
    """``value`` formatted with ``fmt``, or ``missing`` where it is undefined (None, NaN, ±inf)."""
    return missing if is_missing(value) else format(value, fmt)


@dataclass(frozen=True)
class Column:
    """One column of a text table.

    ``value``: the row's key, or a function of the row returning the cell (a number, or text used
    as is). ``fmt``: the format spec numbers get (``".3f"``). ``width``/``align``: the cell is
    padded to ``width`` characters, ``">"`` right or ``"<"`` left. ``title``: the header cell.
    """

    title: str
    width: int
    value: str | Callable[[Mapping[str, Any]], Any]
    fmt: str = ""
    align: str = ">"

    def cell(self, row: Mapping[str, Any], missing: str | None) -> str:
        value = self.value(row) if callable(self.value) else row.get(self.value)
        if isinstance(value, str):
            text = value
        elif missing is not None and is_missing(value):
            text = missing
        else:
            text = format(value, self.fmt)
        return f"{text:{self.align}{self.width}}"

    def header(self) -> str:
        return f"{self.title:{self.align}{self.width}}"


def format_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[Column],
    *,
    header: str | None = None,
    footer: str | None = None,
    sep: str = "",
    missing: str | None = "–",
) -> str:
    """Aligned text: optional ``header`` line, the column titles, one line per row, optional ``footer``.

    ``missing``: the text of undefined numbers (None/NaN/inf); ``None`` formats them as Python does.
    """
    lines = [] if header is None else [header]
    lines.append(sep.join(c.header() for c in columns))
    for row in rows:
        lines.append(sep.join(c.cell(row, missing) for c in columns))
    if footer is not None:
        lines.append(footer)
    return "\n".join(lines)


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """``metrics`` as indented JSON at ``path``, atomically, with undefined values (NaN, inf) as null."""
    return write_json(path, finite(dict(metrics)))


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG at ``path`` (tight layout), atomically; the figure is closed."""
    return save_png(fig, path, dpi=dpi)


__all__ = ["finite", "is_missing", "number", "Column", "format_table", "write_metrics", "save_figure"]

"""Xenium Explorer's exports: the keypoints CSV and the image-alignment CSV.

Keypoints: ``fixedX, fixedY`` on the Xenium side, ``alignmentX, alignmentY`` in H&E level-0
pixels. Alignment: a 3x3 matrix mapping H&E level-0 px -> Xenium morphology-image px.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import InputError

from .fit import RegistrationError, check_alignment_matrix

XENIUM_PIXEL_SIZE_UM = 0.2125  # µm per Xenium morphology-image pixel (experiment.xenium pixel_size)
KEYPOINT_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")


def read_explorer_keypoints(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Xenium Explorer keypoints CSV -> (fixed_xy, moving_xy), each float64 (n, 2).

    fixed = ``fixedX, fixedY`` (Xenium µm); moving = ``alignmentX, alignmentY`` (H&E level-0 px).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "an existing keypoints CSV", "no such file")
    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # pandas raises several types for empty / malformed CSV
        raise InputError(
            path, None, "a CSV with columns " + ",".join(KEYPOINT_COLUMNS), f"{type(exc).__name__}: {exc}"
        ) from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in KEYPOINT_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(
            path,
            "columns",
            "columns " + ",".join(KEYPOINT_COLUMNS),
            f"missing {','.join(missing)}; found {','.join(frame.columns)}",
        )
    values = {}
    for column in KEYPOINT_COLUMNS:
        numeric = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numeric)
        if bad.any():
            rows = (np.flatnonzero(bad)[:5] + 2).tolist()  # +2: header line, 1-based lines
            raise InputError(
                path,
                column,
                "finite numbers in every row",
                f"{int(bad.sum())} empty/NaN/non-numeric values, first at lines {rows}",
            )
        values[column] = numeric
    fixed = np.column_stack([values["fixedX"], values["fixedY"]])
    moving = np.column_stack([values["alignmentX"], values["alignmentY"]])
    if len(fixed) < 3:
        raise RegistrationError(path, "rows", "at least 3 keypoint pairs", f"{len(fixed)}")
    return fixed, moving


def read_explorer_alignment(path: str | Path) -> np.ndarray:
    """Xenium Explorer image alignment CSV -> (3, 3) float64: H&E level-0 px -> morphology px.

    Comma-separated 3x3 with no header, as exported; a header row is skipped when present.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "an existing alignment CSV", "no such file")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if any(c.strip() for c in row)]
    if rows and not _is_numeric_row(rows[0]):
        rows = rows[1:]  # a header row
    try:
        matrix = np.array([[float(cell) for cell in row] for row in rows], dtype=np.float64)
    except ValueError as exc:
        raise InputError(path, None, "a comma-separated 3x3 matrix of numbers", str(exc)) from exc
    return check_alignment_matrix(matrix, path)


def _is_numeric_row(row: Sequence[str]) -> bool:
    try:
        [float(cell) for cell in row]
    except ValueError:
        return False
    return True

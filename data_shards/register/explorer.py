"""Xenium Explorer's exports: the keypoints CSV and the image-alignment CSV.

Units, as Xenium Explorer writes them:

- keypoints (``*_keypoints.csv``): ``fixedX, fixedY`` in Xenium **morphology-image pixels**
  (the DAPI image, ``pixel_size`` µm each in ``experiment.xenium``, 0.2125 µm on every Xenium
  run so far) and ``alignmentX, alignmentY`` in H&E level-0 pixels. A fixed coordinate times
  ``pixel_size`` is the Xenium µm of cells.parquet; a real file's ``fixedY`` reaches tens of
  thousands, impossible in µm on a Xenium slide.
- alignment (``*_imagealignment.csv``): a 3x3 matrix mapping H&E level-0 px -> morphology px
  (10x Genomics' knowledge-base article "How can I convert coordinates between H&E image and
  Xenium data" multiplies its output by ``pixel_size`` to reach µm). Explorer fits it to the
  keypoints, so both files share the morphology-pixel frame.

Keypoints made by other tools may give the fixed side in µm: ``fixed_unit="um"``.
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
# Units the fixed side of a keypoints file may be in: Explorer's own, or µm for files other tools made.
FIXED_UNIT_MORPHOLOGY_PX = "morphology_px"
FIXED_UNIT_UM = "um"
KEYPOINT_FIXED_UNITS = (FIXED_UNIT_MORPHOLOGY_PX, FIXED_UNIT_UM)


def read_explorer_keypoints(
    path: str | Path,
    pixel_size_um: float = XENIUM_PIXEL_SIZE_UM,
    fixed_unit: str = FIXED_UNIT_MORPHOLOGY_PX,
) -> tuple[np.ndarray, np.ndarray]:
    """Xenium Explorer keypoints CSV -> (fixed_um, moving_px), each float64 (n, 2).

    fixed_um: ``fixedX, fixedY`` converted to Xenium µm (the frame of cells.parquet). Explorer
    writes them in morphology-image pixels (``fixed_unit="morphology_px"``, the default), so they
    are multiplied by ``pixel_size_um`` (the experiment's ``pixel_size``); ``fixed_unit="um"``
    takes them as µm unchanged. moving_px: ``alignmentX, alignmentY``, H&E level-0 px, as written.
    The reader converts (rather than returning pixels for the caller to scale) so that no caller
    can forget the unit: everything downstream of this function is in µm.
    """
    path = Path(path)
    if fixed_unit not in KEYPOINT_FIXED_UNITS:
        raise InputError(path, "fixed_unit", " or ".join(KEYPOINT_FIXED_UNITS), fixed_unit)
    try:
        size_um = float(pixel_size_um)
    except (TypeError, ValueError):
        size_um = float("nan")
    if not (np.isfinite(size_um) and size_um > 0):
        raise InputError(path, "pixel_size_um", "a positive morphology-image µm/px", pixel_size_um)
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
    if fixed_unit == FIXED_UNIT_MORPHOLOGY_PX:
        fixed = fixed * size_um  # morphology px -> µm
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

"""Read a 10x Xenium Onboard Analysis (XOA 1.x–4.x) output folder into an AnnData.

One cell per row (in the order of ``cells.parquet``), one "Gene Expression" feature per column,
integer counts in a sparse CSR matrix. Coordinates stay in the units XOA writes: centroids and
boundary vertices in µm, areas in µm²; ``uns["xenium"]["pixel_size"]`` is the morphology image's
µm/pixel.

Counts come either from ``cell_feature_matrix.h5`` (10x HDF5 v3, CSC, one column per cell) or are
rebuilt from ``transcripts.parquet`` (gene transcripts with qv ≥ ``min_qv`` assigned to a cell),
read with pyarrow in record batches because real files hold 100M+ rows.

Control probes and codewords never enter X; their per-cell counts go to ``obs`` as
``<snake_case feature type>_counts`` (e.g. ``negative_control_probe_counts``) unless the cells
table already carries a column of that name, which is kept as XOA wrote it.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Iterable
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from tqdm.auto import tqdm

from common.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "read_xenium",
    "read_boundaries",
    "boundary_polygons",
    "read_experiment",
    "cells_table_path",
    "read_centroids_um",
    "check_bundle",
    "MATRIX_SOURCES",
]

EXPERIMENT_FILE = "experiment.xenium"
MATRIX_FILE = "cell_feature_matrix.h5"
TRANSCRIPTS_FILE = "transcripts.parquet"
GENE_PANEL_FILE = "gene_panel.json"
CELLS_FILES = ("cells.parquet", "cells.csv.gz", "cells.csv")
BOUNDARY_KINDS = ("cell", "nucleus")

MATRIX_SOURCES = ("auto", "h5", "transcripts")
GENE_EXPRESSION = "Gene Expression"
REQUIRED_CELL_COLUMNS = ("cell_id", "x_centroid", "y_centroid", "cell_area", "nucleus_area", "transcript_counts")
REQUIRED_TRANSCRIPT_COLUMNS = ("cell_id", "feature_name", "qv")

# Transcripts not assigned to a cell: XOA < 1.3 writes the integer -1, later versions "UNASSIGNED".
UNASSIGNED_CELL_IDS = frozenset({"-1", "UNASSIGNED", ""})

# v3 transcripts name each codeword's category; map it to the feature type the .h5 uses so
# both matrix sources give the same obs column names.
CODEWORD_CATEGORY_TO_FEATURE_TYPE = {
    "negative_control_probe": "Negative Control Probe",
    "negative_control_codeword": "Negative Control Codeword",
    "genomic_control_probe": "Genomic Control",
    "unassigned_codeword": "Unassigned Codeword",
    "deprecated_codeword": "Deprecated Codeword",
    "blank_codeword": "Blank Codeword",
}
# Older transcripts have neither is_gene nor codeword_category: the feature name tells.
CONTROL_NAME_PREFIXES = (
    ("NegControlProbe_", "Negative Control Probe"),
    ("antisense_", "Negative Control Probe"),
    ("NegControlCodeword_", "Negative Control Codeword"),
    ("BLANK_", "Blank Codeword"),
    ("UnassignedCodeword_", "Unassigned Codeword"),
    ("DeprecatedCodeword_", "Deprecated Codeword"),
    ("Intergenic", "Genomic Control"),
)

UNKNOWN_CONTROL = "Unknown Control"

TRANSCRIPT_BATCH_ROWS = 1 << 20
# Sparse (cell, gene) pairs are packed into one int64 key: cell * stride + gene (genes < 2^24).
_KEY_STRIDE = np.int64(1 << 24)
_COMPACT_EVERY_ENTRIES = 1 << 25


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def read_xenium(
    bundle_dir: str | Path,
    matrix: str = "auto",
    *,
    min_qv: float = 20.0,
    boundaries: bool | str | Iterable[str] = False,
) -> anndata.AnnData:
    """Read a Xenium output folder into an AnnData of shape (n_cells, n_genes).

    Args:
        bundle_dir: the XOA output folder, or the path of its ``experiment.xenium``.
        matrix: where counts come from. ``"h5"``: ``cell_feature_matrix.h5``, whose barcodes must
            be exactly the cells of the cells table. ``"transcripts"``: rebuilt from
            ``transcripts.parquet``. ``"auto"``: the .h5 when present (an InputError if its
            barcodes do not match the cells), else the transcripts.
        min_qv: lowest transcript quality (Phred-scaled qv) counted when ``matrix="transcripts"``;
            XOA's own matrix uses 20.
        boundaries: also attach boundary polygons: ``True`` (cell and nucleus), ``"cell"``,
            ``"nucleus"`` or a list; each lands in ``uns["<kind>_boundaries"]`` as the DataFrame
            :func:`read_boundaries` returns, restricted to the cells read.

    Returns:
        AnnData with X: CSR int32/int64 counts (n_cells, n_genes) of "Gene Expression" features;
        obs: every cells-table column (cell id as str index; centroids in µm, areas in µm²) plus
        control counts; obsm["spatial"]: (n_cells, 2) float64 centroids (x, y) in µm;
        var: gene symbol index, ``gene_ids`` (Ensembl id or ""), ``feature_types``;
        uns["xenium"]: the experiment.xenium dict; uns["xenium_reader"]: how counts were made.
    """
    if matrix not in MATRIX_SOURCES:
        raise InputError(None, "matrix", f"one of {', '.join(repr(m) for m in MATRIX_SOURCES)}", repr(matrix))
    bundle = _bundle_path(bundle_dir)
    experiment = read_experiment(bundle)
    cells, cells_path = _read_cells(bundle)

    h5_path = bundle / MATRIX_FILE
    transcripts_path = bundle / TRANSCRIPTS_FILE
    source = matrix
    if matrix == "auto":
        if h5_path.is_file():
            source = "h5"
        elif transcripts_path.is_file():
            source = "transcripts"
        else:
            raise InputError(bundle, None, f"{MATRIX_FILE} or {TRANSCRIPTS_FILE} in the folder", "neither")

    if source == "h5":
        counts, var, controls = _counts_from_h5(h5_path, cells.index, cells_path)
        source_file = h5_path
    else:
        _require_file(transcripts_path, "transcripts (needed for matrix='transcripts')")
        reference = _reference_genes(bundle)
        counts, var, controls = _counts_from_transcripts(transcripts_path, cells.index, reference, min_qv)
        source_file = transcripts_path

    obs = cells.copy()
    for feature_type, per_cell in controls.items():
        column = _snake_case(feature_type) + "_counts"
        if column in obs.columns:
            # XOA's own per-cell column wins; ours would only repeat (or, on a subset, undercount) it.
            logger.debug("%s: keeping %s from %s", bundle, column, cells_path.name)
            continue
        obs[column] = per_cell
    for column in obs.columns:
        if obs[column].dtype == object or pd.api.types.is_string_dtype(obs[column].dtype):
            obs[column] = obs[column].astype("category")

    var = _unique_gene_symbols(var, source_file)
    adata = anndata.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["spatial"] = obs[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)  # (n_cells, 2) µm
    adata.uns["xenium"] = experiment
    adata.uns["xenium_reader"] = {
        "matrix_source": source,
        "matrix_file": source_file.name,
        "cells_file": cells_path.name,
        # For the .h5, qv filtering was done by XOA (qv ≥ 20); min_qv applies to transcripts only.
        "min_qv": float(min_qv) if source == "transcripts" else 20.0,
    }
    for kind in _boundary_kinds(boundaries):
        table = read_boundaries(bundle, kind)
        adata.uns[f"{kind}_boundaries"] = table[table["cell_id"].isin(adata.obs_names)].reset_index(drop=True)

    logger.info(
        "read %s: %d cells x %d genes, %d counts, matrix from %s",
        bundle,
        adata.n_obs,
        adata.n_vars,
        int(counts.sum()),
        source_file.name,
    )
    return adata


def check_bundle(bundle_dir: str | Path, matrix: str = "auto") -> Path:
    """Check, without reading the counts, that :func:`read_xenium` can open the bundle; returns its folder.

    ``experiment.xenium`` parses with a pixel size; the cells table is read in full (it is
    small) and checked as ``read_xenium`` checks it; the count source opens: the .h5's header
    and barcode list (as many as cells), or the transcripts' Parquet footer and columns. A
    build calls this on every slide before it writes anything, so a bad file in the last
    slide is reported before the first slide is sharded. Damage deep inside the counts is
    found only when they are read.
    """
    if matrix not in MATRIX_SOURCES:
        raise InputError(None, "matrix", f"one of {', '.join(repr(m) for m in MATRIX_SOURCES)}", repr(matrix))
    bundle = _bundle_path(bundle_dir)
    read_experiment(bundle)
    cells, cells_path = _read_cells(bundle)
    h5_path, transcripts_path = bundle / MATRIX_FILE, bundle / TRANSCRIPTS_FILE
    if matrix == "h5" or (matrix == "auto" and h5_path.is_file()):
        _require_file(h5_path, "the cell-feature matrix (needed for matrix='h5')")
        try:
            with _open_h5(h5_path) as handle:
                _h5_features(handle, h5_path)
                if "matrix/barcodes" not in handle:
                    raise InputError(h5_path, "matrix/barcodes", "a 10x HDF5 v3 matrix dataset", "missing")
                n_barcodes = len(handle["matrix/barcodes"])
        except (OSError, RuntimeError) as error:
            raise InputError(h5_path, None, "a readable 10x HDF5 v3 matrix", _damaged(error)) from None
        if n_barcodes != len(cells):
            raise InputError(
                h5_path,
                "matrix/barcodes",
                f"one barcode for each cell of {cells_path.name}; "
                f'pass matrix="transcripts" to rebuild counts from {TRANSCRIPTS_FILE}',
                f"{len(cells)} cells in {cells_path.name}, {n_barcodes} barcodes in {h5_path.name}",
            )
    elif matrix == "transcripts" or transcripts_path.is_file():
        _require_file(transcripts_path, "transcripts (needed for matrix='transcripts')")
        try:
            schema = pq.read_schema(transcripts_path)
        except (pa.ArrowException, OSError) as error:
            raise _unreadable(transcripts_path, error) from None
        _require_columns(schema, transcripts_path, REQUIRED_TRANSCRIPT_COLUMNS)
    else:
        raise InputError(bundle, None, f"{MATRIX_FILE} or {TRANSCRIPTS_FILE} in the folder", "neither")
    return bundle


def read_experiment(bundle_dir: str | Path) -> dict:
    """The experiment.xenium JSON as a dict; ``pixel_size`` (µm/pixel) must be a positive number."""
    path = _bundle_path(bundle_dir) / EXPERIMENT_FILE
    _require_file(path, "the XOA experiment description")
    try:
        experiment = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(path, None, "a JSON object", f"unreadable JSON ({error})") from None
    if not isinstance(experiment, dict):
        raise InputError(path, None, "a JSON object", type(experiment).__name__)
    pixel_size = experiment.get("pixel_size")
    if isinstance(pixel_size, bool) or not isinstance(pixel_size, (int, float)) or not pixel_size > 0:
        found = "missing" if "pixel_size" not in experiment else repr(pixel_size)
        raise InputError(path, "pixel_size", "a positive number (µm/pixel of the morphology image)", found)
    return experiment


def read_boundaries(bundle_dir: str | Path, kind: str = "cell") -> pd.DataFrame:
    """Boundary polygons: one row per vertex, ``cell_id`` (str), ``vertex_x``, ``vertex_y`` (µm).

    XOA repeats each polygon's first vertex at its end; rows keep the file's order, so the
    vertices of one cell are consecutive. Other columns (e.g. ``label_id``) are kept.
    """
    if kind not in BOUNDARY_KINDS:
        raise InputError(None, "kind", f"one of {BOUNDARY_KINDS}", repr(kind))
    bundle = _bundle_path(bundle_dir)
    stem = f"{kind}_boundaries"
    path = _first_existing(bundle, (f"{stem}.parquet", f"{stem}.csv.gz", f"{stem}.csv"))
    if path is None:
        raise InputError(
            bundle / f"{stem}.parquet", None, f"the {kind} boundaries file ({stem}.parquet or .csv.gz)", "missing"
        )
    table = _read_table(path)
    _require_columns(table, path, ("cell_id", "vertex_x", "vertex_y"))
    frame = _table_with_str_ids(table, path).to_pandas()
    for axis in ("vertex_x", "vertex_y"):
        frame[axis] = frame[axis].astype(np.float64)
        n_nan = int(frame[axis].isna().sum())
        if n_nan:
            raise InputError(path, axis, "finite vertex coordinates in µm", f"{n_nan} NaN values")
    return frame


def boundary_polygons(bundle_dir: str | Path, kind: str, cell_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """cell id -> (n, 2) float64 boundary vertices in µm (first vertex repeated last, as XOA writes
    them), for the ``cell_ids`` that have a polygon; the vertices of a cell are consecutive rows."""
    table = read_boundaries(bundle_dir, kind)
    table = table[table["cell_id"].isin(set(cell_ids))]
    ids = table["cell_id"].to_numpy()
    xy_um = table[["vertex_x", "vertex_y"]].to_numpy(np.float64)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    return {str(ids[s]): xy_um[s:e] for s, e in zip(starts, ends)}


# --------------------------------------------------------------------------------------------
# Files and tables
# --------------------------------------------------------------------------------------------


def _bundle_path(bundle_dir: str | Path) -> Path:
    path = Path(bundle_dir)
    if path.is_file() and path.name.endswith(".xenium"):
        return path.parent
    if not path.exists():
        raise InputError(path, None, "a Xenium output folder (with experiment.xenium)", "no such file or folder")
    if not path.is_dir():
        raise InputError(path, None, "a Xenium output folder or its experiment.xenium", "a different file")
    return path


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise InputError(path, None, f"{path.name}: {what}", "missing")


def _first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def _table_format(path: Path) -> str:
    """What a table file must be, as the error message says it ("a readable Parquet file", ...)."""
    if path.suffix == ".parquet":
        return "a readable Parquet file"
    return "a readable gzip-compressed CSV file" if path.name.endswith(".gz") else "a readable CSV file"


def _unreadable(path: Path, error: BaseException) -> InputError:
    # pyarrow's own text ("Parquet magic bytes not found in footer") names no file; say which one.
    return InputError(path, None, _table_format(path), _damaged(error))


def _damaged(error: BaseException) -> str:
    """The library's reason on one line (some end in a newline), after what it means for the user."""
    return f"a damaged or truncated file ({type(error).__name__}: {' '.join(str(error).split())})"


def _read_table(path: Path, columns: Iterable[str] | None = None) -> pa.Table:
    """The whole table, or only ``columns`` (each must be there) of a Parquet or CSV(.gz) file."""
    wanted = None if columns is None else list(columns)
    try:
        if path.suffix == ".parquet":
            if wanted is not None:
                _require_columns(pq.read_schema(path), path, wanted)
            return pq.read_table(path, columns=wanted)
        # round_trip: the value written, not pandas' faster parse that can be off in the last digit
        usecols = None if wanted is None else (lambda c: c in wanted)
        frame = pd.read_csv(path, usecols=usecols, float_precision="round_trip")
    except (pa.ArrowException, OSError, EOFError, zlib.error, ValueError, UnicodeDecodeError) as error:
        if isinstance(error, InputError):
            raise
        raise _unreadable(path, error) from None
    # R and pandas write their row numbers as an unnamed first column; it is not data.
    frame = frame.loc[:, [not re.fullmatch(r"Unnamed: \d+", str(c)) for c in frame.columns]]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if wanted is not None:
        _require_columns(table, path, wanted)
    return table


def _require_columns(table: pa.Table | pa.Schema, path: Path, columns: Iterable[str]) -> None:
    names = table.names if isinstance(table, pa.Schema) else table.column_names
    for column in columns:
        if column not in names:
            raise InputError(path, column, f"a column {column!r}", f"columns {names}")


def _ids_as_str(ids: pa.Array | pa.ChunkedArray, path: Path, field: str) -> pa.ChunkedArray | pa.Array:
    """Cell ids as UTF-8 strings: integers (XOA < 1.3) become str(int), bytes are decoded."""
    if isinstance(ids, pa.ChunkedArray) and pa.types.is_dictionary(ids.type):
        ids = ids.cast(ids.type.value_type)
    elif isinstance(ids, pa.Array) and pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    kind = ids.type
    if pa.types.is_floating(kind):
        values = ids.to_numpy(zero_copy_only=False) if isinstance(ids, pa.Array) else ids.to_numpy()
        if ids.null_count or not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise InputError(path, field, "integer or string cell ids", "non-integer numbers")
        ids = pc.cast(ids, pa.int64())
    elif not (
        pa.types.is_integer(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        raise InputError(path, field, "integer or string cell ids", str(kind))
    try:
        return pc.cast(ids, pa.string())
    except pa.ArrowInvalid:
        raise InputError(path, field, "UTF-8 cell ids", "undecodable bytes") from None


def _table_with_str_ids(table: pa.Table, path: Path) -> pa.Table:
    index = table.column_names.index("cell_id")
    ids = _ids_as_str(table.column("cell_id"), path, "cell_id")
    if ids.null_count:
        raise InputError(path, "cell_id", "a cell id on every row", f"{ids.null_count} missing")
    return table.set_column(index, "cell_id", ids)


def cells_table_path(bundle_dir: str | Path) -> Path:
    """The bundle's cells table: ``cells.parquet``, else ``cells.csv.gz``, else ``cells.csv``.

    Every reader of the cells (counts, registration overlay, input fingerprint) goes through
    here, so a bundle that XOA wrote with the CSV only is read the same way everywhere.
    """
    bundle = _bundle_path(bundle_dir)
    path = find_cells_table(bundle)
    if path is None:
        raise InputError(bundle / CELLS_FILES[0], None, f"the cells table ({' or '.join(CELLS_FILES)})", "missing")
    return path


def find_cells_table(bundle_dir: str | Path) -> Path | None:
    """The bundle's cells table (as :func:`cells_table_path`), or None when there is none."""
    return _first_existing(Path(bundle_dir), CELLS_FILES)


def read_centroids_um(bundle_dir: str | Path) -> np.ndarray:
    """(n_cells, 2) float64 ``x_centroid, y_centroid`` in µm, in the cells table's row order.

    Reads only the two columns, so it is cheap on a million-cell table; NaN rows are kept
    (the caller decides whether they matter).
    """
    path = cells_table_path(bundle_dir)
    table = _read_table(path, columns=("x_centroid", "y_centroid"))
    columns = []
    for axis in ("x_centroid", "y_centroid"):
        values = pd.to_numeric(table.column(axis).to_pandas(), errors="coerce").to_numpy(dtype=np.float64)
        columns.append(values)
    return np.column_stack(columns)


def _read_cells(bundle: Path) -> tuple[pd.DataFrame, Path]:
    """The cells table indexed by cell id (str), columns as XOA wrote them."""
    path = cells_table_path(bundle)
    table = _read_table(path)
    _require_columns(table, path, REQUIRED_CELL_COLUMNS)
    if table.num_rows == 0:
        raise InputError(path, None, "at least one cell", "an empty table")
    cells = _table_with_str_ids(table, path).to_pandas()
    duplicated = cells["cell_id"].duplicated()
    if duplicated.any():
        raise InputError(
            path,
            "cell_id",
            "unique cell ids",
            f"{int(duplicated.sum())} repeated, e.g. {cells['cell_id'][duplicated].iloc[0]!r}",
        )
    for axis in ("x_centroid", "y_centroid"):
        n_nan = int(pd.to_numeric(cells[axis], errors="coerce").isna().sum())
        if n_nan:
            raise InputError(path, axis, "a finite centroid (µm) for every cell", f"{n_nan} NaN of {len(cells)} cells")
        cells[axis] = cells[axis].astype(np.float64)
    cells = cells.set_index(pd.Index(cells.pop("cell_id").astype(str).to_numpy(dtype=object), name="cell_id"))
    return cells, path


# --------------------------------------------------------------------------------------------
# Counts from cell_feature_matrix.h5
# --------------------------------------------------------------------------------------------


def _decode_strings(dataset: h5py.Dataset) -> np.ndarray:
    values = dataset[()]
    if values.dtype.kind in "iu":
        return np.array([str(v) for v in values], dtype=object)
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _whole_numbers(values: np.ndarray, path: Path, field: str, dtype: type) -> np.ndarray:
    """Integer copy of ``values``; floats (R writes float64) must be finite, whole and ≥ 0."""
    if values.dtype.kind in "iu":
        if values.size and values.min() < 0:
            raise InputError(path, field, "non-negative integers", f"minimum {values.min()}")
        return values.astype(dtype, copy=False)
    if values.dtype.kind != "f":
        raise InputError(path, field, "numbers", str(values.dtype))
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)) or (values.size and values.min() < 0):
        raise InputError(path, field, "non-negative whole numbers", f"{values.dtype} values that are not")
    return values.astype(dtype)


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise InputError(path, None, "a readable 10x HDF5 v3 matrix", _damaged(error)) from None


def _h5_features(handle: h5py.File, path: Path) -> pd.DataFrame:
    """The matrix features: gene_ids, name, feature_types (one row per matrix row)."""
    for name in ("features/id", "features/name", "features/feature_type"):
        if f"matrix/{name}" not in handle:
            raise InputError(path, f"matrix/{name}", "a 10x HDF5 v3 matrix dataset", "missing")
    group = handle["matrix/features"]
    return pd.DataFrame(
        {
            "gene_ids": _decode_strings(group["id"]),
            "name": _decode_strings(group["name"]),
            "feature_types": _decode_strings(group["feature_type"]),
        }
    )


def _read_h5_matrix(path: Path) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame]:
    """(counts (n_barcodes, n_features) CSR, barcodes, features with gene_ids, name, feature_types)."""
    try:
        return _read_h5_matrix_unchecked(path)
    except (OSError, RuntimeError) as error:
        # h5py opens a file whose header is intact and fails only on the damaged dataset.
        raise InputError(path, None, "a readable 10x HDF5 v3 matrix", _damaged(error)) from None


def _read_h5_matrix_unchecked(path: Path) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame]:
    with _open_h5(path) as handle:
        for name in ("data", "indices", "indptr", "shape", "barcodes"):
            if f"matrix/{name}" not in handle:
                raise InputError(path, f"matrix/{name}", "a 10x HDF5 v3 matrix dataset", "missing")
        features = _h5_features(handle, path)
        group = handle["matrix"]
        shape = _whole_numbers(np.asarray(group["shape"][()]).ravel(), path, "matrix/shape", np.int64)
        if shape.size != 2:
            raise InputError(path, "matrix/shape", "(n_features, n_barcodes)", shape.tolist())
        barcodes = _decode_strings(group["barcodes"])
        n_features, n_barcodes = int(shape[0]), int(shape[1])
        if n_features == 0 or n_barcodes == 0:
            raise InputError(path, "matrix/shape", "a non-empty matrix", f"shape {shape.tolist()}")
        if len(barcodes) != n_barcodes:
            raise InputError(path, "matrix/barcodes", f"{n_barcodes} barcodes (matrix/shape[1])", len(barcodes))
        if len(features) != n_features:
            raise InputError(path, "matrix/features", f"{n_features} features (matrix/shape[0])", len(features))
        data = np.asarray(group["data"][()])
        indices = _whole_numbers(np.asarray(group["indices"][()]), path, "matrix/indices", np.int64)
        indptr = _whole_numbers(np.asarray(group["indptr"][()]), path, "matrix/indptr", np.int64)
    if len(indptr) != n_barcodes + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise InputError(
            path,
            "matrix/indptr",
            f"{n_barcodes + 1} non-decreasing offsets from 0 (CSC, one column per cell)",
            f"{len(indptr)} values",
        )
    if not (len(data) == len(indices) == indptr[-1]):
        raise InputError(
            path,
            "matrix/data",
            f"{indptr[-1]} stored values (matrix/indptr[-1]) in data and indices",
            f"{len(data)} data, {len(indices)} indices",
        )
    if indices.size and indices.max() >= n_features:
        raise InputError(path, "matrix/indices", f"feature indices below {n_features}", f"maximum {indices.max()}")
    if len(set(barcodes)) != len(barcodes):
        raise InputError(path, "matrix/barcodes", "unique barcodes", f"{len(barcodes) - len(set(barcodes))} repeated")
    data = _whole_numbers(data, path, "matrix/data", np.int64)
    dtype = np.int32 if data.size == 0 or data.max() <= np.iinfo(np.int32).max else np.int64
    # CSC (features x barcodes) transposed is CSR (barcodes x features) over the same arrays.
    counts = sp.csr_matrix((data.astype(dtype), indices, indptr), shape=(n_barcodes, n_features))
    return counts, barcodes, features


def _counts_from_h5(
    path: Path, cell_ids: pd.Index, cells_path: Path
) -> tuple[sp.csr_matrix, pd.DataFrame, dict[str, np.ndarray]]:
    counts, barcodes, features = _read_h5_matrix(path)
    row_of_cell = pd.Index(barcodes).get_indexer(cell_ids)
    overlap = int((row_of_cell >= 0).sum())
    if overlap != len(cell_ids) or len(barcodes) != len(cell_ids):
        raise InputError(
            path,
            "matrix/barcodes",
            f"one barcode for each cell of {cells_path.name} (the matrix belongs to another cell set); "
            f'pass matrix="transcripts" to rebuild counts from {TRANSCRIPTS_FILE}',
            f"{len(cell_ids)} cells in {cells_path.name}, {len(barcodes)} barcodes in {path.name}, {overlap} in common",
        )
    counts = counts[row_of_cell]  # rows now in cells-table order
    is_gene = (features["feature_types"] == GENE_EXPRESSION).to_numpy()
    if not is_gene.any():
        raise InputError(
            path,
            "matrix/features/feature_type",
            f"at least one {GENE_EXPRESSION!r} feature",
            sorted(set(features["feature_types"])),
        )
    controls = {
        feature_type: np.asarray(counts[:, (features["feature_types"] == feature_type).to_numpy()].sum(axis=1)).ravel()
        for feature_type in dict.fromkeys(features["feature_types"][~is_gene])
    }
    genes = features[is_gene]
    var = pd.DataFrame(
        {"gene_ids": genes["gene_ids"].to_numpy(), "feature_types": genes["feature_types"].to_numpy()},
        index=pd.Index(genes["name"].to_numpy(), name=None),
    )
    x = counts[:, np.flatnonzero(is_gene)].tocsr()
    x.eliminate_zeros()  # some writers (R) store explicit zeros
    x.sort_indices()
    return x, var, controls


# --------------------------------------------------------------------------------------------
# Counts rebuilt from transcripts.parquet
# --------------------------------------------------------------------------------------------


def _reference_genes(bundle: Path) -> dict[str, dict[str, str]]:
    """Gene panels the bundle describes: {source name: {symbol: Ensembl id}}, in panel order."""
    panels: dict[str, dict[str, str]] = {}
    panel_path = bundle / GENE_PANEL_FILE
    if panel_path.is_file():
        try:
            targets = json.loads(panel_path.read_text(encoding="utf-8"))["payload"]["targets"]
            panels[GENE_PANEL_FILE] = {
                t["type"]["data"]["name"]: t["type"]["data"].get("id", "")
                for t in targets
                if t["type"].get("descriptor", "gene") == "gene"
            }
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            logger.warning("%s: no gene list read (%s); gene ids may be empty", panel_path, error)
    h5_path = bundle / MATRIX_FILE
    if h5_path.is_file():
        try:
            with _open_h5(h5_path) as handle:
                features = _h5_features(handle, h5_path)
            genes = features[features["feature_types"] == GENE_EXPRESSION]
            panels[MATRIX_FILE] = dict(zip(genes["name"], genes["gene_ids"]))
        except InputError as error:
            logger.warning("gene ids not taken from %s: %s", h5_path.name, error)
    return panels


def _as_string_array(array: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return pc.cast(array, pa.string())


def _classify_names(names: list[str]) -> tuple[np.ndarray, list[str | None]]:
    """Per feature name: whether it is a gene, and its control feature type (None for genes)."""
    control_types: list[str | None] = []
    for name in names:
        control_types.append(next((ft for prefix, ft in CONTROL_NAME_PREFIXES if name.startswith(prefix)), None))
    return np.array([t is None for t in control_types], dtype=bool), control_types


def _control_kinds_from_category(category: pa.Array) -> tuple[list[str], np.ndarray]:
    """(feature type names, per-transcript code into them) from v3 ``codeword_category``."""
    encoded = pc.dictionary_encode(_as_string_array(category))
    names = [CODEWORD_CATEGORY_TO_FEATURE_TYPE.get(c, c) or UNKNOWN_CONTROL for c in encoded.dictionary.to_pylist()]
    codes = pc.fill_null(encoded.indices, len(names)).to_numpy(zero_copy_only=False)
    return names + [UNKNOWN_CONTROL], codes


class _TranscriptCounter:
    """Accumulates (cell, gene) counts and per-cell control counts over record batches."""

    def __init__(self, n_cells: int):
        self.n_cells = n_cells
        self.gene_column: dict[str, int] = {}  # symbol -> column, in order of first sight
        self.controls: dict[str, np.ndarray] = {}
        self._keys: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._pending = 0

    def columns_for(self, names: list[str]) -> np.ndarray:
        return np.array([self.gene_column.setdefault(n, len(self.gene_column)) for n in names], dtype=np.int64)

    def add_genes(self, rows: np.ndarray, columns: np.ndarray) -> None:
        keys, counts = np.unique(rows.astype(np.int64) * _KEY_STRIDE + columns, return_counts=True)
        self._keys.append(keys)
        self._counts.append(counts.astype(np.int64))
        self._pending += len(keys)
        if self._pending > _COMPACT_EVERY_ENTRIES:
            self._compact()

    def add_controls(self, feature_type: str, rows: np.ndarray) -> None:
        per_cell = np.bincount(rows, minlength=self.n_cells).astype(np.int64)
        self.controls[feature_type] = self.controls.get(feature_type, 0) + per_cell

    def _compact(self) -> None:
        if len(self._keys) > 1:
            keys, inverse = np.unique(np.concatenate(self._keys), return_inverse=True)
            self._keys = [keys]
            self._counts = [np.bincount(inverse, weights=np.concatenate(self._counts)).astype(np.int64)]
        self._pending = 0

    def matrix(self, final_column: np.ndarray, n_columns: int) -> sp.csr_matrix:
        """CSR (n_cells, n_columns); the gene first seen as column i lands in final_column[i]."""
        self._compact()
        keys = self._keys[0] if self._keys else np.zeros(0, np.int64)
        counts = self._counts[0] if self._counts else np.zeros(0, np.int64)
        rows, columns = keys // _KEY_STRIDE, final_column[keys % _KEY_STRIDE]
        dtype = np.int32 if counts.size == 0 or counts.max() <= np.iinfo(np.int32).max else np.int64
        x = sp.coo_matrix((counts.astype(dtype), (rows, columns)), shape=(self.n_cells, n_columns)).tocsr()
        x.sort_indices()
        return x


def _record_batches(parquet: pq.ParquetFile, path: Path, **kwargs) -> Iterable[pa.RecordBatch]:
    """``parquet.iter_batches(**kwargs)``; a damaged row group (the footer read fine) is an InputError."""
    batches = parquet.iter_batches(**kwargs)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as error:
            raise _unreadable(path, error) from None
        yield batch


def _counts_from_transcripts(
    path: Path, cell_ids: pd.Index, reference: dict[str, dict[str, str]], min_qv: float
) -> tuple[sp.csr_matrix, pd.DataFrame, dict[str, np.ndarray]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise _unreadable(path, error) from None
    available = parquet.schema_arrow.names
    for column in REQUIRED_TRANSCRIPT_COLUMNS:
        if column not in available:
            raise InputError(path, column, f"a column {column!r}", f"columns {available}")
    optional = [c for c in ("is_gene", "codeword_category") if c in available]
    cells = pa.array(list(cell_ids), type=pa.string())
    unassigned = pa.array(sorted(UNASSIGNED_CELL_IDS), type=pa.string())
    counter = _TranscriptCounter(len(cell_ids))
    tally = {"rows": 0, "low_qv": 0, "unassigned": 0, "other_cells": 0}

    progress = tqdm(total=parquet.metadata.num_rows, unit="transcript", desc=path.name, disable=None, leave=False)
    for batch in _record_batches(
        parquet, path, batch_size=TRANSCRIPT_BATCH_ROWS, columns=[*REQUIRED_TRANSCRIPT_COLUMNS, *optional]
    ):
        progress.update(batch.num_rows)
        tally["rows"] += batch.num_rows
        qv = pc.fill_null(pc.cast(batch.column("qv"), pa.float64()), -np.inf).to_numpy(zero_copy_only=False)
        cell_text = _ids_as_str(batch.column("cell_id"), path, "cell_id")
        row = pc.fill_null(pc.index_in(cell_text, value_set=cells), -1).to_numpy(zero_copy_only=False)
        is_unassigned = pc.fill_null(pc.is_in(cell_text, value_set=unassigned), True).to_numpy(zero_copy_only=False)

        names = pc.dictionary_encode(_as_string_array(batch.column("feature_name")))
        name_code = pc.fill_null(names.indices, 0).to_numpy(zero_copy_only=False)
        dictionary = names.dictionary.to_pylist() or [""]
        name_is_gene, name_control = _classify_names(dictionary)
        if "is_gene" in optional:
            is_gene = pc.fill_null(batch.column("is_gene"), False).to_numpy(zero_copy_only=False)
        elif "codeword_category" in optional:
            category = _as_string_array(batch.column("codeword_category"))
            is_gene = pc.fill_null(pc.ends_with(category, "_gene"), False).to_numpy(zero_copy_only=False)
        else:
            is_gene = name_is_gene[name_code]

        # Every gene name seen (any qv, any cell) decides var, so var does not depend on min_qv.
        gene_codes = np.unique(name_code[is_gene])
        column_of_code = np.full(len(dictionary), -1, dtype=np.int64)
        column_of_code[gene_codes] = counter.columns_for([dictionary[c] for c in gene_codes])

        good_qv = qv >= min_qv
        tally["low_qv"] += int((~good_qv).sum())
        tally["unassigned"] += int((good_qv & is_unassigned).sum())
        tally["other_cells"] += int((good_qv & ~is_unassigned & (row < 0)).sum())
        counted = good_qv & (row >= 0)
        genes = counted & is_gene
        counter.add_genes(row[genes], column_of_code[name_code[genes]])

        if "codeword_category" in optional:
            kind_names, kind_code = _control_kinds_from_category(batch.column("codeword_category"))
        else:
            kind_names, kind_code = [name or UNKNOWN_CONTROL for name in name_control], name_code
        controls = counted & ~is_gene
        # Every control type present in the file gets a column, even if no cell has one.
        for code in np.unique(kind_code[~is_gene]):
            counter.add_controls(kind_names[code], row[controls & (kind_code == code)])
    progress.close()

    if tally["rows"] == 0:
        raise InputError(path, None, "at least one transcript", "an empty table")
    if tally["other_cells"]:
        logger.warning(
            "%s: %d transcripts (qv >= %g) name cells absent from the cells table; not counted",
            path.name,
            tally["other_cells"],
            min_qv,
        )
    logger.info(
        "%s: %d transcripts, %d below qv %g, %d unassigned",
        path.name,
        tally["rows"],
        tally["low_qv"],
        min_qv,
        tally["unassigned"],
    )

    seen = list(counter.gene_column)
    if not seen:
        raise InputError(path, "feature_name", "at least one gene transcript", "only control probes/codewords")
    panel_name, panel = next(((n, p) for n, p in reference.items() if set(seen) <= set(p)), (None, {}))
    if panel_name is not None:
        symbols = list(panel)  # the whole panel, so genes never detected still get a (zero) column
        ids = [panel[s] for s in symbols]
    else:
        symbols = sorted(seen)
        lookup = {s: i for p in reference.values() for s, i in p.items()}
        ids = [lookup.get(s, "") for s in symbols]
        if reference:
            logger.warning(
                "%s: gene names do not all appear in %s; gene ids left empty where unknown",
                path.name,
                " or ".join(reference),
            )
    position = {s: j for j, s in enumerate(symbols)}
    x = counter.matrix(np.array([position[s] for s in seen], dtype=np.int64), len(symbols))
    var = pd.DataFrame({"gene_ids": ids, "feature_types": GENE_EXPRESSION}, index=pd.Index(symbols))
    return x, var, counter.controls


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _snake_case(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def _unique_gene_symbols(var: pd.DataFrame, path: Path) -> pd.DataFrame:
    symbols = var.index.astype(str)
    if symbols.is_unique:
        return var.set_axis(symbols)
    repeated = sorted(set(symbols[symbols.duplicated()]))
    logger.warning("%s: repeated gene symbols %s made unique with -1, -2, ... suffixes", path.name, repeated[:10])
    return var.set_axis(anndata.utils.make_index_unique(pd.Index(symbols)))


def _boundary_kinds(boundaries: bool | str | Iterable[str]) -> list[str]:
    if boundaries is False or boundaries is None:
        return []
    if boundaries is True:
        return list(BOUNDARY_KINDS)
    kinds = [boundaries] if isinstance(boundaries, str) else list(boundaries)
    for kind in kinds:
        if kind not in BOUNDARY_KINDS:
            raise InputError(None, "boundaries", f"True, False or kinds among {BOUNDARY_KINDS}", repr(kind))
    return kinds

"""Write the files of a Xenium Onboard Analysis v3 output folder (used by the synthetic bundles).

Formats follow XOA 3.x: ``experiment.xenium`` (JSON, ``major_version`` 5), ``cells.parquet``
(14 columns), ``cell_feature_matrix.h5`` (10x HDF5 v3, CSC with one column per cell),
``cell_boundaries.parquet`` / ``nucleus_boundaries.parquet`` (one row per vertex, first vertex
repeated) and ``transcripts.parquet`` (one row per decoded transcript). All lengths are µm.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from common.atomic import write_json

PIXEL_SIZE_UM = 0.2125

CELLS_SCHEMA = pa.schema(
    [
        ("cell_id", pa.large_string()),
        ("x_centroid", pa.float64()),
        ("y_centroid", pa.float64()),
        ("transcript_counts", pa.int64()),
        ("control_probe_counts", pa.int64()),
        ("genomic_control_counts", pa.int64()),
        ("control_codeword_counts", pa.int64()),
        ("unassigned_codeword_counts", pa.int64()),
        ("deprecated_codeword_counts", pa.int64()),
        ("total_counts", pa.int64()),
        ("cell_area", pa.float64()),
        ("nucleus_area", pa.float64()),
        ("nucleus_count", pa.int64()),
        ("segmentation_method", pa.large_string()),
    ]
)

BOUNDARY_SCHEMA = pa.schema(
    [
        ("cell_id", pa.large_string()),
        ("vertex_x", pa.float32()),
        ("vertex_y", pa.float32()),
        ("label_id", pa.uint32()),
    ]
)

TRANSCRIPTS_SCHEMA = pa.schema(
    [
        ("transcript_id", pa.uint64()),
        ("cell_id", pa.large_string()),
        ("overlaps_nucleus", pa.uint8()),
        ("feature_name", pa.large_string()),
        ("x_location", pa.float32()),
        ("y_location", pa.float32()),
        ("z_location", pa.float32()),
        ("qv", pa.float32()),
        ("fov_name", pa.large_string()),
        ("nucleus_distance", pa.float32()),
        ("codeword_index", pa.int32()),
        ("codeword_category", pa.large_string()),
        ("is_gene", pa.bool_()),
    ]
)


def xenium_cell_ids(n: int, first: int = 0) -> np.ndarray:
    """XOA ≥ 1.3 style ids: an integer written in base 16 with digits a–p, 8 letters, then ``-1``."""
    values = np.arange(first, first + n, dtype=np.uint64)
    shifts = np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(4)
    digits = ((values[:, None] >> shifts[None, :]) & np.uint64(15)).astype(np.uint8) + ord("a")
    suffix = np.frombuffer(b"-1", dtype=np.uint8)
    raw = np.concatenate([digits, np.broadcast_to(suffix, (n, 2))], axis=1)
    return np.ascontiguousarray(raw).view("S10").ravel().astype(str)


def ellipse_polygons(
    center_xy: np.ndarray, semi_major: np.ndarray, semi_minor: np.ndarray, angle_rad: np.ndarray, n_vertices: int
) -> np.ndarray:
    """(n, n_vertices + 1, 2) closed polygons (first vertex repeated), counter-clockwise in x-right y-down."""
    t = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    t = np.append(t, 0.0)
    u = semi_major[:, None] * np.cos(t)[None, :]
    v = semi_minor[:, None] * np.sin(t)[None, :]
    c, s = np.cos(angle_rad)[:, None], np.sin(angle_rad)[:, None]
    x = center_xy[:, 0:1] + u * c - v * s
    y = center_xy[:, 1:2] + u * s + v * c
    return np.stack([x, y], axis=2)


def polygon_areas(polygons: np.ndarray) -> np.ndarray:
    """(n,) shoelace areas of closed (n, V + 1, 2) polygons."""
    x, y = polygons[..., 0], polygons[..., 1]
    return 0.5 * np.abs(np.sum(x[:, :-1] * y[:, 1:] - x[:, 1:] * y[:, :-1], axis=1))


def write_experiment(path: Path, fields: dict) -> None:
    write_json(path, fields)


def write_cells(path: Path, columns: dict) -> None:
    table = pa.table({name: columns[name] for name in CELLS_SCHEMA.names}, schema=CELLS_SCHEMA)
    pq.write_table(table, path, compression="zstd")


def write_boundaries(path: Path, cell_ids: pa.Array, polygons: np.ndarray, chunk_cells: int = 200_000) -> None:
    """One row per vertex; ``label_id`` is the 1-based cell index (as in XOA's label masks)."""
    n, v = polygons.shape[:2]
    with pq.ParquetWriter(path, BOUNDARY_SCHEMA, compression="snappy", use_dictionary=["cell_id"]) as writer:
        for start in range(0, n, chunk_cells):
            stop = min(start + chunk_cells, n)
            cell_index = np.repeat(np.arange(start, stop), v)
            block = polygons[start:stop].reshape(-1, 2)
            writer.write_table(
                pa.table(
                    {
                        "cell_id": cell_ids.take(pa.array(cell_index)),
                        "vertex_x": block[:, 0].astype(np.float32),
                        "vertex_y": block[:, 1].astype(np.float32),
                        "label_id": (cell_index + 1).astype(np.uint32),
                    },
                    schema=BOUNDARY_SCHEMA,
                )
            )


def write_feature_matrix(
    path: Path,
    counts: sp.csr_matrix,
    barcodes: np.ndarray,
    feature_ids: np.ndarray,
    feature_names: np.ndarray,
    feature_types: np.ndarray,
    genome: str = "GRCh38",
    software_version: str = "xenium-3.0.0.15",
) -> None:
    """10x HDF5 v3: ``counts`` is (n_cells, n_features); stored as CSC (features × cells)."""
    counts = sp.csr_matrix(counts)
    counts.sort_indices()
    n_cells, n_features = counts.shape

    def strings(values: Iterable[str]) -> np.ndarray:
        return np.array([str(v).encode() for v in values])

    with h5py.File(path, "w") as h5:
        h5.attrs["filetype"] = "matrix"
        h5.attrs["version"] = 2
        h5.attrs["software_version"] = software_version
        h5.attrs["chemistry_description"] = "Xenium"
        h5.attrs["library_ids"] = np.array([b"synthetic"])
        h5.attrs["original_gem_groups"] = np.array([1])
        m = h5.create_group("matrix")
        options = dict(compression="gzip", compression_opts=1, shuffle=True)
        m.create_dataset("barcodes", data=strings(barcodes), **options)
        m.create_dataset("data", data=counts.data.astype(np.int32), **options)
        m.create_dataset("indices", data=counts.indices.astype(np.int64), **options)
        m.create_dataset("indptr", data=counts.indptr.astype(np.int64), **options)
        m.create_dataset("shape", data=np.array([n_features, n_cells], dtype=np.int32))
        f = m.create_group("features")
        f.create_dataset("id", data=strings(feature_ids))
        f.create_dataset("name", data=strings(feature_names))
        f.create_dataset("feature_type", data=strings(feature_types))
        f.create_dataset("genome", data=strings([genome] * n_features))
        f.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


FOV_UM = 400.0


def fov_codes(x_um: np.ndarray, y_um: np.ndarray, n_cols: int, fov_um: float = FOV_UM) -> np.ndarray:
    """Index into :func:`fov_table` of the field of view holding each point (row-major grid from 0, 0)."""
    rows = np.maximum((np.asarray(y_um) // fov_um).astype(np.int64), 0)
    cols = np.clip((np.asarray(x_um) // fov_um).astype(np.int64), 0, n_cols - 1)
    return rows * n_cols + cols


def fov_table(max_x_um: float, max_y_um: float, fov_um: float = FOV_UM) -> tuple[int, pa.Array]:
    """(n_cols, names) of a FOV grid covering [0, max]: "A1", "A2", … (row letters, 1-based column)."""
    n_cols = int(max(max_x_um, 0) // fov_um) + 1
    n_rows = int(max(max_y_um, 0) // fov_um) + 1

    def letters(i: int) -> str:
        out = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            out = chr(65 + r) + out
        return out

    names = [f"{letters(r)}{c + 1}" for r in range(n_rows) for c in range(n_cols)]
    return n_cols, pa.array(names, type=pa.large_string())


# Columns of XOA 3's metrics_summary.csv, in its order (checked against a public XOA 3.0 output).
METRICS_SUMMARY_COLUMNS = (
    "run_name,cassette_name,region_name,panel_name,panel_design_id,predesigned_panel_id,region_area,"
    "total_cell_area,total_high_quality_decoded_transcripts,fraction_transcripts_decoded_q20,"
    "fraction_predesigned_transcripts_decoded_q20,fraction_custom_transcripts_decoded_q20,"
    "nuclear_transcripts_per_100um2,decoded_transcripts_per_100um2,adjusted_negative_control_probe_rate,"
    "adjusted_negative_control_codeword_rate,adjusted_genomic_control_probe_rate,"
    "negative_control_probe_counts_per_control_per_cell,genomic_control_probe_counts_per_control_per_cell,"
    "estimated_number_of_false_positive_transcripts_per_cell,"
    "estimated_number_of_false_positive_transcripts_per_cell_including_genomic_counts,num_cells_detected,"
    "fraction_empty_cells,cells_per_100um2,fraction_transcripts_assigned,median_genes_per_cell,"
    "median_predesigned_genes_per_cell,median_custom_genes_per_cell,median_transcripts_per_cell,"
    "median_predesigned_transcripts_per_cell,median_custom_transcripts_per_cell,thickness_transcripts_high_quality,"
    "stain_definition,segmented_cell_stain_frac,segmented_cell_boundary_frac,segmented_cell_interior_frac,"
    "segmented_cell_nuc_expansion_frac,segmented_cell_boundary_count,segmented_cell_interior_count,"
    "segmented_cell_nuc_expansion_count,fraction_of_ambiguous_nucleus_mask_pixels,"
    "fraction_of_ambiguous_cell_mask_pixels,fraction_of_nucleus_polygons_removed,fraction_of_cell_polygons_removed,"
    "fraction_of_nuclei_without_cell,number_of_cell_non_simple_polygons,number_of_cell_multi_polygons,"
    "number_of_nucleus_non_simple_polygons,number_of_nucleus_multi_polygons,segmented_cell_imported_frac,"
    "segmented_cell_imported_count"
).split(",")

# gene_panel.json descriptor of each feature kind (data_shards.synthetic.panel kinds).
PANEL_DESCRIPTORS = {
    "gene": "gene",
    "probe": "negative_control",
    "codeword": "negative_control_codeword",
    "unassigned": "unassigned_codeword",
}


def write_metrics_summary(path: Path, values: dict) -> None:
    """One-row CSV with XOA 3's columns; a metric not given is left empty (as XOA does for ones it skips)."""
    unknown = sorted(set(values) - set(METRICS_SUMMARY_COLUMNS))
    if unknown:
        raise ValueError(f"not metrics_summary.csv columns: {unknown}")

    def cell(value) -> str:
        if value is None:
            return ""
        text = repr(float(value)) if isinstance(value, float | np.floating) else str(value)
        return f'"{text}"' if "," in text or '"' in text else text

    row = [cell(values.get(name)) for name in METRICS_SUMMARY_COLUMNS]
    path.write_text(",".join(METRICS_SUMMARY_COLUMNS) + "\n" + ",".join(row) + "\n", encoding="utf-8")


def write_gene_panel(
    path: Path, feature_ids: np.ndarray, feature_names: np.ndarray, kinds: np.ndarray, codewords: np.ndarray, name: str
) -> None:
    """``gene_panel.json``: ``{"metadata", "payload": {"panel", "targets"}}``, one target per feature.

    Each target is ``{"type": {"descriptor", "data": {"id", "name"}}, "codewords": [...]}`` as in
    XOA's panel files ("gene" for genes, "negative_control" for control probes); the codeword is
    the feature's ``codeword_index`` in transcripts.parquet.
    """
    targets = []
    for feature_id, feature_name, kind, codeword in zip(feature_ids, feature_names, kinds, codewords):
        data = {"id": str(feature_id), "name": str(feature_name)} if kind == "gene" else {"name": str(feature_name)}
        targets.append(
            {"type": {"descriptor": PANEL_DESCRIPTORS[str(kind)], "data": data}, "codewords": [int(codeword)]}
        )
    write_json(
        path,
        {
            "metadata": {"file_format_version": "1.0", "generator": "data_shards.synthetic"},
            "payload": {
                "panel": {"name": name, "organism": "Human", "tissue_type": "Skin", "num_targets": len(targets)},
                "targets": targets,
            },
        },
    )

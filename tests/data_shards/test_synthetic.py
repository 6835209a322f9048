"""Synthetic bundles: real-format files, a recoverable planted map, and image-tied biology."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import tifffile

from common.errors import InputError
from data_shards.slide import Slide
from data_shards.synthetic import DEFAULT_SLIDE, make_bundle, planted_map

CELLS_COLUMNS = [
    "cell_id",
    "x_centroid",
    "y_centroid",
    "transcript_counts",
    "control_probe_counts",
    "genomic_control_counts",
    "control_codeword_counts",
    "unassigned_codeword_counts",
    "deprecated_codeword_counts",
    "total_counts",
    "cell_area",
    "nucleus_area",
    "nucleus_count",
    "segmentation_method",
]
TRANSCRIPT_COLUMNS = [
    "transcript_id",
    "cell_id",
    "overlaps_nucleus",
    "feature_name",
    "x_location",
    "y_location",
    "z_location",
    "qv",
    "fov_name",
    "nucleus_distance",
    "codeword_index",
    "codeword_category",
    "is_gene",
]


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory) -> tuple[Path, dict]:
    if not DEFAULT_SLIDE.is_file():
        pytest.skip(f"demo slide not fetched yet ({DEFAULT_SLIDE}); run `make setup`")
    out = tmp_path_factory.mktemp("real") / "bundle"
    return out, make_bundle(out, "real", seed=3, deformation_um=10.0)


@pytest.fixture(scope="module")
def rigid_bundle(tmp_path_factory) -> tuple[Path, dict]:
    """Procedural, no deformation: the keypoints follow a pure similarity."""
    out = tmp_path_factory.mktemp("procedural") / "bundle"
    return out, make_bundle(
        out, "procedural", n_cells=3000, seed=5, he_um_per_px=0.2738, deformation_um=0.0, n_keypoints=50
    )


def read_matrix(path: Path) -> tuple[sp.csc_matrix, np.ndarray, pd.DataFrame]:
    """(features × cells) counts, barcodes, features table, straight from the 10x HDF5."""
    with h5py.File(path, "r") as h5:
        m = h5["matrix"]
        shape = tuple(int(v) for v in m["shape"][:])
        counts = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape)
        barcodes = m["barcodes"][:].astype(str)
        features = pd.DataFrame({k: m["features"][k][:].astype(str) for k in ("id", "name", "feature_type", "genome")})
        assert m["features"]["_all_tag_keys"][:].astype(str).tolist() == ["genome"]
    return counts, barcodes, features


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(3, 3) least-squares similarity src → dst (Umeyama 1991), written out here on purpose."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    u, sv, vt = np.linalg.svd(d0.T @ s0 / len(src))
    d = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rotation = u @ d @ vt
    scale = np.trace(np.diag(sv) @ d) / (s0**2).sum(axis=1).mean()
    out = np.eye(3)
    out[:2, :2] = scale * rotation
    out[:2, 2] = mu_d - scale * rotation @ mu_s
    return out


@pytest.mark.parametrize("which", ["real_bundle", "rigid_bundle"])
def test_bundle_has_every_file_with_the_agreed_columns(which, request):
    bundle, truth = request.getfixturevalue(which)
    experiment = json.loads((bundle / "experiment.xenium").read_text())
    assert experiment["major_version"] == 5 and experiment["pixel_size"] == 0.2125
    assert experiment["num_cells"] == truth["n_cells"] and "morphology_focus_filepath" in experiment["images"]
    for name in list(experiment["images"].values()) + list(experiment["xenium_explorer_files"].values()):
        assert (bundle / name).is_file(), f"experiment.xenium names {name}, which the bundle lacks"
    assert (bundle / "gene_panel.json").is_file() and (bundle / "metrics_summary.csv").is_file()

    cells = pq.read_table(bundle / "cells.parquet").to_pandas()
    assert list(cells.columns) == CELLS_COLUMNS
    assert len(cells) == truth["n_cells"] and cells.cell_id.is_unique
    assert cells.cell_id.str.fullmatch(r"[a-p]{8}-1").all()
    assert (cells.cell_area > cells.nucleus_area).all()
    gene_side = cells.transcript_counts + cells.control_probe_counts + cells.control_codeword_counts
    assert (cells.total_counts == gene_side + cells.unassigned_codeword_counts).all()

    counts, barcodes, features = read_matrix(bundle / "cell_feature_matrix.h5")
    assert counts.shape == (len(features), len(cells)) and list(barcodes) == list(cells.cell_id)
    assert set(features.feature_type) == {
        "Gene Expression",
        "Negative Control Probe",
        "Negative Control Codeword",
        "Unassigned Codeword",
    }
    genes = features[features.feature_type == "Gene Expression"]
    assert genes.name.tolist() == truth["gene_panel"] and genes.id.tolist() == truth["gene_ids"]
    assert {"KRT5", "KRT14", "COL1A1", "PTPRC", "PECAM1"} <= set(genes.name)
    gene_rows = (features.feature_type == "Gene Expression").to_numpy()
    np.testing.assert_array_equal(np.asarray(counts[gene_rows].sum(axis=0)).ravel(), cells.transcript_counts)
    assert 100 <= cells.transcript_counts.mean() <= 300

    for name, min_vertices in (("cell_boundaries", 13), ("nucleus_boundaries", 9)):
        boundaries = pq.read_table(bundle / f"{name}.parquet").to_pandas()
        assert {"cell_id", "vertex_x", "vertex_y", "label_id"} <= set(boundaries.columns)
        first = boundaries.groupby("cell_id", sort=False).nth(0)
        last = boundaries.groupby("cell_id", sort=False).nth(-1)
        np.testing.assert_array_equal(
            first[["vertex_x", "vertex_y"]].to_numpy(), last[["vertex_x", "vertex_y"]].to_numpy()
        )
        assert boundaries.groupby("cell_id").size().min() >= min_vertices
        assert set(boundaries.cell_id) == set(cells.cell_id)

    transcripts = pq.read_table(bundle / "transcripts.parquet")
    assert transcripts.column_names == TRANSCRIPT_COLUMNS

    truth_cells = pq.read_table(bundle / "ground_truth_cells.parquet").to_pandas()
    assert {"cell_id", "cell_type", "x_um", "y_um", "he_x_px", "he_y_px"} <= set(truth_cells.columns)
    assert set(truth_cells.cell_type) <= set(truth["cell_types"])
    np.testing.assert_allclose(truth_cells[["x_um", "y_um"]], cells[["x_centroid", "y_centroid"]])

    saved = json.loads((bundle / "ground_truth.json").read_text())
    for key in (
        "rotation_deg",
        "scale",
        "translation",
        "xenium_um_to_he_px",
        "deformation",
        "he_um_per_px",
        "n_cells",
        "cell_types",
        "cell_type_counts",
        "gene_panel",
        "seed",
        "mode",
    ):
        assert key in saved
    assert 3.0 <= abs(saved["rotation_deg"]) <= 20.0
    assert saved["scale"] == pytest.approx(1.0 / saved["he_um_per_px"])


@pytest.mark.parametrize("which", ["real_bundle", "rigid_bundle"])
def test_he_slide_is_a_tiled_jpeg_pyramid_with_the_right_pixel_size(which, request):
    bundle, truth = request.getfixturevalue(which)
    path = bundle / "he" / "post_xenium_he.ome.tif"
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.is_bigtiff
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert page.shape == (*truth["he_shape_px"], 3)
        levels = tif.series[0].levels
        assert len(levels) >= 2 and len(page.subifds) == len(levels) - 1
        for level in levels[1:]:
            assert level.keyframe.subfiletype == 1 and level.keyframe.is_tiled
        assert max(levels[-1].shape[:2]) < 1024
    with Slide(path) as slide:
        assert slide.um_per_px == pytest.approx(truth["he_um_per_px"], rel=1e-6)
        assert slide.downsample(1) == pytest.approx(2.0, rel=1e-3)
        assert slide.read_region(0, 0, 64, 64).dtype == np.uint8


def test_real_mode_slide_is_the_cmu_pixels(real_bundle):
    bundle, truth = real_bundle
    with Slide(DEFAULT_SLIDE) as source, Slide(bundle / "he" / "post_xenium_he.ome.tif") as written:
        assert written.shape == source.shape
        a = source.read_region(700, 1200, 256, 256).astype(float)
        b = written.read_region(700, 1200, 256, 256).astype(float)
    assert np.abs(a - b).mean() < 6.0  # JPEG q90 re-encoding only


@pytest.mark.parametrize("which", ["real_bundle", "rigid_bundle"])
def test_planted_map_round_trip_and_truth_positions(which, request):
    bundle, truth = request.getfixturevalue(which)
    mapping = planted_map(bundle)  # from the folder: ground_truth.json
    xy_um = np.random.default_rng(0).uniform(0, 1500, size=(2000, 2))
    he_px = mapping(xy_um)
    assert np.abs(mapping.inverse(he_px) - xy_um).max() < 1e-3
    truth_cells = pq.read_table(bundle / "ground_truth_cells.parquet").to_pandas()
    mapped = mapping(truth_cells[["x_um", "y_um"]].to_numpy())
    np.testing.assert_allclose(
        mapped, truth_cells[["he_x_px", "he_y_px"]].to_numpy(), atol=1e-3 / truth["he_um_per_px"]
    )
    # Every cell lies on the slide.
    h, w = truth["he_shape_px"]
    assert (mapped >= 0).all() and (mapped[:, 0] < w).all() and (mapped[:, 1] < h).all()


def test_deformation_is_planted_and_bounded(real_bundle):
    bundle, truth = real_bundle
    mapping = planted_map(truth)
    truth_cells = pq.read_table(bundle / "ground_truth_cells.parquet").to_pandas()
    xy = truth_cells[["x_um", "y_um"]].to_numpy()
    similarity = np.asarray(truth["xenium_um_to_he_px"])
    global_only = xy @ similarity[:2, :2].T + similarity[:2, 2]
    offset_um = np.linalg.norm(mapping(xy) - global_only, axis=1) * truth["he_um_per_px"]
    assert offset_um.max() > 1.0  # a real local deformation ...
    assert offset_um.max() < 4 * 10.0  # ... of the requested size (4 bumps of ≤ 10 µm)


def test_keypoints_fit_the_planted_similarity(rigid_bundle):
    bundle, truth = rigid_bundle
    keypoints = pd.read_csv(bundle / "he" / "keypoints.csv")
    assert list(keypoints.columns) == ["fixedX", "fixedY", "alignmentX", "alignmentY"]
    assert 30 <= len(keypoints) <= 60
    # As Xenium Explorer writes them: fixedX, fixedY in morphology px; × pixel_size gives Xenium µm.
    fixed_px = keypoints[["fixedX", "fixedY"]].to_numpy()
    fixed = fixed_px * truth["xenium_pixel_size_um"]
    moving = keypoints[["alignmentX", "alignmentY"]].to_numpy()
    fitted = umeyama(fixed, moving)
    planted = np.asarray(truth["xenium_um_to_he_px"])
    fitted_rotation = np.degrees(np.arctan2(fitted[1, 0], fitted[0, 0]))
    assert fitted_rotation == pytest.approx(truth["rotation_deg"], abs=0.1)
    assert np.linalg.norm(fitted[:2, 0]) == pytest.approx(truth["scale"], rel=0.005)
    # Over the tissue the fitted and planted maps agree to about a pixel (noise σ = 0.3 µm).
    probe = fixed
    gap_px = np.linalg.norm(
        (probe @ fitted[:2, :2].T + fitted[:2, 2]) - (probe @ planted[:2, :2].T + planted[:2, 2]), axis=1
    )
    assert gap_px.max() < 0.5 / truth["he_um_per_px"]
    # The points are spread over the tissue, not bunched.
    span = fixed.max(axis=0) - fixed.min(axis=0)
    cells = pq.read_table(bundle / "cells.parquet", columns=["x_centroid", "y_centroid"]).to_pandas().to_numpy()
    assert (span > 0.6 * (cells.max(axis=0) - cells.min(axis=0))).all()
    assert (fixed_px.max(axis=0) > 3 * cells.max(axis=0)).all()  # pixels, not µm (1 / 0.2125 = 4.7)


def test_keypoints_follow_the_deformed_map(real_bundle):
    bundle, truth = real_bundle
    keypoints = pd.read_csv(bundle / "he" / "keypoints.csv")
    fixed_um = keypoints[["fixedX", "fixedY"]].to_numpy() * truth["xenium_pixel_size_um"]  # morphology px -> µm
    predicted = planted_map(truth)(fixed_um)
    residual_um = np.linalg.norm(predicted - keypoints[["alignmentX", "alignmentY"]].to_numpy(), axis=1)
    residual_um *= truth["he_um_per_px"]
    noise = truth["keypoint_noise_um"]
    assert residual_um.mean() < 3 * noise and residual_um.max() < 8 * noise


@pytest.mark.parametrize("which", ["real_bundle", "rigid_bundle"])
def test_explorer_alignment_maps_he_pixels_to_morphology_pixels(which, request):
    bundle, truth = request.getfixturevalue(which)
    matrix = np.loadtxt(bundle / "he" / "he_imagealignment.csv", delimiter=",")
    assert matrix.shape == (3, 3) and np.allclose(matrix[2], [0, 0, 1])
    truth_cells = pq.read_table(bundle / "ground_truth_cells.parquet").to_pandas()
    he = truth_cells[["he_x_px", "he_y_px"]].to_numpy()
    morph_px = he @ matrix[:2, :2].T + matrix[:2, 2]
    error_um = np.linalg.norm(morph_px * 0.2125 - truth_cells[["x_um", "y_um"]].to_numpy(), axis=1)
    if truth["deformation"]["sigmas_px"]:
        assert np.median(error_um) < 40.0  # global part only; the local deformation remains
    else:
        assert error_um.max() < 1e-6


@pytest.mark.parametrize("which", ["real_bundle", "rigid_bundle"])
def test_matrix_equals_transcripts_with_qv_20_assigned_to_cells(which, request):
    bundle, _ = request.getfixturevalue(which)
    counts, barcodes, features = read_matrix(bundle / "cell_feature_matrix.h5")
    tx = pq.read_table(
        bundle / "transcripts.parquet", columns=["cell_id", "feature_name", "qv", "codeword_category", "is_gene"]
    ).to_pandas()
    assert (tx.qv < 20).mean() > 0.01 and (tx.cell_id == "UNASSIGNED").mean() > 0.01
    assert set(tx.codeword_category) >= {"predesigned_gene", "negative_control_probe", "negative_control_codeword"}
    kept = tx[(tx.qv >= 20) & (tx.cell_id != "UNASSIGNED")]
    grouped = kept.groupby(["feature_name", "cell_id"]).size()
    col = pd.Index(barcodes).get_indexer(grouped.index.get_level_values("cell_id"))
    row = pd.Index(features.name).get_indexer(grouped.index.get_level_values("feature_name"))
    assert (col >= 0).all() and (row >= 0).all()
    rebuilt = sp.csc_matrix((grouped.to_numpy(), (row, col)), shape=counts.shape)
    assert (rebuilt != counts).nnz == 0
    assert kept.is_gene.sum() == counts[(features.feature_type == "Gene Expression").to_numpy()].sum()


def test_transcripts_lie_inside_their_cells(rigid_bundle):
    bundle, _ = rigid_bundle
    cells = pq.read_table(bundle / "cells.parquet").to_pandas().set_index("cell_id")
    tx = pq.read_table(bundle / "transcripts.parquet").to_pandas()
    assigned = tx[tx.cell_id != "UNASSIGNED"]
    centre = cells.loc[assigned.cell_id, ["x_centroid", "y_centroid"]].to_numpy()
    radius = np.sqrt(cells.loc[assigned.cell_id, "cell_area"].to_numpy() / np.pi)
    distance = np.linalg.norm(assigned[["x_location", "y_location"]].to_numpy() - centre, axis=1)
    assert (distance <= 3.0 * radius).all()  # ellipses: within the long semi-axis
    assert assigned.overlaps_nucleus.isin([0, 1]).all() and 0.05 < assigned.overlaps_nucleus.mean() < 0.9
    assert (assigned.nucleus_distance[assigned.overlaps_nucleus == 1] == 0).all()


def test_same_seed_same_bundle_other_seed_other_bundle(tmp_path):
    def build(name, seed):
        make_bundle(tmp_path / name, "procedural", n_cells=600, seed=seed)
        return tmp_path / name

    a, b, c = build("a", 11), build("b", 11), build("c", 12)
    for name in ("cells", "transcripts", "cell_boundaries", "nucleus_boundaries", "ground_truth_cells"):
        assert pq.read_table(a / f"{name}.parquet").equals(pq.read_table(b / f"{name}.parquet")), name
    assert not pq.read_table(a / "cells.parquet").equals(pq.read_table(c / "cells.parquet"))
    for path in ("he/keypoints.csv", "he/he_imagealignment.csv", "experiment.xenium"):
        assert (a / path).read_bytes() == (b / path).read_bytes(), path
    ta, tb = (json.loads((d / "ground_truth.json").read_text()) for d in (a, b))
    ta.pop("seconds"), tb.pop("seconds")
    assert ta == tb
    with h5py.File(a / "cell_feature_matrix.h5") as ha, h5py.File(b / "cell_feature_matrix.h5") as hb:
        for key in ("data", "indices", "indptr", "barcodes"):
            np.testing.assert_array_equal(ha["matrix"][key][:], hb["matrix"][key][:])
    np.testing.assert_array_equal(
        tifffile.imread(a / "he/post_xenium_he.ome.tif"), tifffile.imread(b / "he/post_xenium_he.ome.tif")
    )


def _hematoxylin_at(slide_path: Path, xy_px: np.ndarray, half: int = 2) -> np.ndarray:
    """Mean hematoxylin optical density of a (2·half+1)² patch at each point, measured on the written slide."""
    from skimage.color import rgb2hed

    with Slide(slide_path) as slide:
        h, w = slide.shape
        image = slide.read_region(0, 0, w, h)
    hema = rgb2hed(image)[..., 0]
    out = np.empty(len(xy_px))
    for i, (x, y) in enumerate(np.round(xy_px).astype(int)):
        out[i] = hema[max(y - half, 0) : y + half + 1, max(x - half, 0) : x + half + 1].mean()
    return out


def test_real_cell_types_follow_the_image(real_bundle):
    bundle, truth = real_bundle
    truth_cells = pq.read_table(bundle / "ground_truth_cells.parquet").to_pandas()
    cells = pq.read_table(bundle / "cells.parquet").to_pandas()
    counts = truth["cell_type_counts"]
    assert all(counts[t] >= 30 for t in truth["cell_types"]), counts
    hema = _hematoxylin_at(bundle / "he" / "post_xenium_he.ome.tif", truth_cells[["he_x_px", "he_y_px"]].to_numpy())
    by_type = pd.DataFrame({"type": truth_cells.cell_type, "hema": hema, "nucleus_area": cells.nucleus_area})
    means = by_type.groupby("type").mean()
    # Immune cells were planted on small, dark nuclei; fibroblasts on the other stromal nuclei.
    assert means.loc["immune", "nucleus_area"] < 0.8 * means.loc["fibroblast", "nucleus_area"]
    assert means.loc["immune", "hema"] > means.loc["fibroblast", "hema"]
    # Keratinocytes sit in the epidermis: their neighbourhood is denser in nuclei than the dermis'.
    from scipy.spatial import cKDTree

    xy = truth_cells[["x_um", "y_um"]].to_numpy()
    density = np.array([len(n) for n in cKDTree(xy).query_ball_point(xy, r=25.0)])
    keratinocyte = truth_cells.cell_type.str.startswith("keratinocyte").to_numpy()
    assert density[keratinocyte].mean() > 1.3 * density[truth_cells.cell_type == "fibroblast"].mean()


def test_expression_carries_the_image_signal(real_bundle):
    bundle, truth = real_bundle
    counts, barcodes, features = read_matrix(bundle / "cell_feature_matrix.h5")
    truth_cells = pq.read_table(bundle / "ground_truth_cells.parquet").to_pandas()
    assert list(barcodes) == list(truth_cells.cell_id)
    dense = pd.DataFrame(counts.toarray().T, columns=features.name)
    norm = dense.div(dense.sum(axis=1), axis=0)
    types = truth_cells.cell_type.to_numpy()
    for cell_type, marker in (
        ("keratinocyte_basal", "KRT14"),
        ("keratinocyte_suprabasal", "KRT10"),
        ("fibroblast", "COL1A1"),
        ("immune", "PTPRC"),
        ("endothelial", "PECAM1"),
    ):
        inside = norm.loc[types == cell_type, marker].mean()
        outside = norm.loc[types != cell_type, marker].mean()
        assert inside > 4 * outside, (cell_type, marker)
    # Within basal keratinocytes, proliferation genes rise with nucleus hematoxylin.
    basal = types == "keratinocyte_basal"
    prolif = norm.loc[basal, ["MKI67", "TOP2A"]].sum(axis=1).to_numpy()
    hema = truth_cells.nucleus_hematoxylin.to_numpy()[basal]
    assert np.corrcoef(np.log(hema), prolif)[0, 1] > 0.1


def test_bad_arguments_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="mode"):
        make_bundle(tmp_path / "x", "imaginary")
    with pytest.raises(InputError, match="deformation_um"):
        make_bundle(tmp_path / "x", "procedural", n_cells=10, deformation_um=-1)
    with pytest.raises(InputError, match="ground_truth.json"):
        planted_map(tmp_path / "nowhere")
    assert not (tmp_path / "x").exists()

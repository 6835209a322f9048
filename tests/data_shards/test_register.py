"""Registration Xenium µm -> H&E level-0 px: planted maps built here with numpy, recovered by the fit."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image
from skimage import draw as skdraw
from skimage import transform as sktransform

from common.config import load_config
from common.errors import InputError
from data_shards.register import (
    Registration,
    RegistrationError,
    apply_transform,
    fit_transform,
    read_explorer_alignment,
    read_explorer_keypoints,
    register_bundle,
)
from data_shards.register.registration import leave_one_out_um
from data_shards.register.report import format_table, write_overlay
from data_shards.schema import DataConfig
from data_shards.stages import run_make_shards

HE_UM_PER_PX = 0.5  # planted H&E pixel size: 2 px per µm
SLIDE_UM = 3000.0  # planted tissue extent (µm)


def rotation(theta: float) -> np.ndarray:
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def planted_similarity(
    theta: float = 0.35, px_per_um: float = 1 / HE_UM_PER_PX, shift_px: tuple[float, float] = (850.0, -120.0)
) -> np.ndarray:
    """(3, 3) µm -> px."""
    matrix = np.eye(3)
    matrix[:2, :2] = px_per_um * rotation(theta)
    matrix[:2, 2] = shift_px
    return matrix


def deformation_px(xy_um: np.ndarray, amplitude_px: float = 40.0) -> np.ndarray:
    """A smooth tissue warp (px): one wavelength across the slide, so no single similarity fits it."""
    k = 2 * np.pi / SLIDE_UM
    return amplitude_px * np.column_stack([np.sin(k * xy_um[:, 1]), np.sin(k * xy_um[:, 0] + 0.5)])


def planted_map(xy_um: np.ndarray, deformed: bool = False) -> np.ndarray:
    px = apply_transform(planted_similarity(), xy_um)
    return px + deformation_px(xy_um) if deformed else px


def keypoints(n: int, noise_px: float, seed: int, deformed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fixed = rng.uniform(0, SLIDE_UM, size=(n, 2))
    return fixed, planted_map(fixed, deformed) + rng.normal(0, noise_px, size=(n, 2))


def rms_um(predicted_px: np.ndarray, true_px: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((predicted_px - true_px) ** 2, axis=1)))) * HE_UM_PER_PX


def dense_grid_um(margin: float = 300.0, n: int = 40) -> np.ndarray:
    axis = np.linspace(margin, SLIDE_UM - margin, n)
    return np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)


def skimage_estimate(cls, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    if hasattr(cls, "from_estimate"):  # scikit-image >= 0.26
        return cls.from_estimate(src, dst).params
    tform = cls()
    assert tform.estimate(src, dst)
    return tform.params


# ---- the fit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mirrored", [False, True])
@pytest.mark.parametrize("scale", [True, False])
def test_fit_agrees_with_skimage(scale: bool, mirrored: bool) -> None:
    src, dst = keypoints(25, noise_px=2.0, seed=1)
    if not scale:
        dst = apply_transform(np.diag([HE_UM_PER_PX, HE_UM_PER_PX, 1.0]), dst)  # rigid needs equal units
    if mirrored:
        dst = dst * [-1.0, 1.0]
    cls = sktransform.SimilarityTransform if scale else sktransform.EuclideanTransform
    np.testing.assert_allclose(fit_transform(src, dst, scale=scale), skimage_estimate(cls, src, dst), atol=1e-6, rtol=0)


def test_mirrored_points_give_best_proper_rotation() -> None:
    src, dst = keypoints(30, noise_px=1.0, seed=2)
    dst = dst * [1.0, -1.0]  # a reflection: no rotation can match it exactly
    matrix = fit_transform(src, dst, scale=True)
    assert np.linalg.det(matrix[:2, :2]) > 0

    def best_sse_at(theta: float) -> float:
        # For a fixed rotation the optimal scale and translation are closed-form.
        src_c, dst_c = src - src.mean(0), dst - dst.mean(0)
        rotated = src_c @ rotation(theta).T
        s = (rotated * dst_c).sum() / (rotated**2).sum()
        return float(((s * rotated - dst_c) ** 2).sum())

    brute = min(best_sse_at(t) for t in np.linspace(-np.pi, np.pi, 20001))
    ours = float(((apply_transform(matrix, src) - dst) ** 2).sum())
    assert ours <= brute * (1 + 1e-6)


def test_recovers_planted_similarity_under_half_micron() -> None:
    fixed, moving = keypoints(20, noise_px=1.5, seed=3)  # 0.75 µm keypoint noise
    registration = Registration.global_fit(fixed, moving)
    grid = dense_grid_um()
    error = rms_um(registration.map(grid), planted_map(grid))
    assert error < 0.5
    assert registration.he_um_per_px == pytest.approx(HE_UM_PER_PX, rel=2e-3)
    rigid = Registration.global_fit(fixed, moving, scale=False, he_um_per_px=HE_UM_PER_PX)
    assert rms_um(rigid.map(grid), planted_map(grid)) < 0.5


def test_regions_and_blend_beat_global_on_deformed_slide() -> None:
    fixed, moving = keypoints(150, noise_px=1.0, seed=4, deformed=True)
    held_out = np.random.default_rng(5).uniform(300, SLIDE_UM - 300, size=(2000, 2))
    truth = planted_map(held_out, deformed=True)
    one = rms_um(Registration.global_fit(fixed, moving).map(held_out), truth)
    nearest = rms_um(Registration.from_keypoints(fixed, moving, regions=9).map(held_out), truth)
    blended = rms_um(Registration.from_keypoints(fixed, moving, regions=9, blend=True).map(held_out), truth)
    assert nearest < 0.7 * one
    assert blended < 0.7 * one
    assert blended < nearest  # the smooth mix follows a smooth warp better than Voronoi steps


def test_explicit_labels_and_merging_of_small_regions(caplog: pytest.LogCaptureFixture) -> None:
    fixed, moving = keypoints(30, noise_px=0.5, seed=6)
    labels = (fixed[:, 0] > SLIDE_UM / 2).astype(np.int64)
    labels[np.argmax(fixed[:, 1])] = 7  # a region of one point cannot be fitted alone
    with caplog.at_level(logging.INFO, logger="data_shards.register"):
        registration = Registration.from_keypoints(fixed, moving, regions=labels, min_points_per_region=4)
    assert sorted(r.label for r in registration.regions) == [0, 1]
    assert sum(len(r.fixed_um) for r in registration.regions) == 30
    assert "region 7" in caplog.text and "merged" in caplog.text


@pytest.mark.parametrize("blend", [False, True])
def test_inverse_map_round_trip(blend: bool) -> None:
    fixed, moving = keypoints(150, noise_px=1.0, seed=7, deformed=True)
    registration = Registration.from_keypoints(fixed, moving, regions=6, blend=blend)
    points = np.random.default_rng(8).uniform(0, SLIDE_UM, size=(500, 2))
    back = registration.inverse_map(registration.map(points))
    assert np.median(np.abs(back - points)) < 1e-6
    # Nearest mode is discontinuous: points near a border may land in the neighbour's cell.
    assert np.mean(np.abs(back - points).max(axis=1) < 1e-6) > 0.95


# ---- quality ------------------------------------------------------------------------------------


def test_residuals_and_leave_one_out_match_a_direct_computation() -> None:
    fixed, moving = keypoints(12, noise_px=2.0, seed=9)
    registration = Registration.global_fit(fixed, moving)
    report = registration.report()
    residual_um = np.linalg.norm(registration.map(fixed) - moving, axis=1) * registration.he_um_per_px
    assert report["overall"]["rms_um"] == pytest.approx(np.sqrt(np.mean(residual_um**2)), rel=1e-9)
    keep = np.arange(12) != 4
    refit = fit_transform(fixed[keep], moving[keep])
    expected = np.linalg.norm(apply_transform(refit, fixed[4:5])[0] - moving[4]) / np.sqrt(np.linalg.det(refit[:2, :2]))
    assert leave_one_out_um(registration, 0)[4] == pytest.approx(expected, rel=1e-9)
    assert report["overall"]["loo_rms_um"] > report["overall"]["rms_um"]  # held-out errors are larger
    json.dumps(report, allow_nan=False)
    assert "loo rms" in format_table(report)


def test_check_refuses_inaccurate_keypoints_naming_file_and_region() -> None:
    fixed, moving = keypoints(20, noise_px=20.0, seed=10)  # ~10 µm keypoint noise
    registration = Registration.from_keypoints(fixed, moving, source="slide7/keypoints.csv")
    registration.check(max_rms_um=50.0, max_loo_um=50.0)
    with pytest.raises(RegistrationError, match=r"slide7/keypoints.csv \[region 0\].*RMS"):
        registration.check(max_rms_um=2.0)
    with pytest.raises(RegistrationError, match=r"slide7/keypoints.csv \[region 0\].*leave-one-out"):
        registration.check(max_loo_um=2.0)


# ---- Xenium Explorer files ----------------------------------------------------------------------


MORPHOLOGY_UM_PER_PX = 0.2125  # Xenium's morphology-image pixel (experiment.xenium pixel_size)


def write_keypoints_csv(path, fixed_um, moving_px, unit: str = "morphology_px") -> None:
    """As Xenium Explorer writes them: fixedX, fixedY in morphology px; ``unit="um"`` as other tools may."""
    fixed = fixed_um / MORPHOLOGY_UM_PER_PX if unit == "morphology_px" else fixed_um
    rows = ["fixedX,fixedY,alignmentX,alignmentY"] + [f"{a},{b},{c},{d}" for (a, b), (c, d) in zip(fixed, moving_px)]
    path.write_text("\n".join(rows) + "\n")


def test_read_explorer_keypoints(tmp_path) -> None:
    """Explorer's morphology px come back as µm (× pixel_size); a µm file is read as µm when told so."""
    fixed, moving = keypoints(7, noise_px=0.0, seed=11)
    path = tmp_path / "keypoints.csv"
    write_keypoints_csv(path, fixed, moving)
    got_fixed, got_moving = read_explorer_keypoints(path)
    np.testing.assert_allclose(got_fixed, fixed)
    np.testing.assert_allclose(got_moving, moving)
    got_fixed, _ = read_explorer_keypoints(path, pixel_size_um=0.5)  # another instrument's pixel
    np.testing.assert_allclose(got_fixed, fixed / MORPHOLOGY_UM_PER_PX * 0.5)
    write_keypoints_csv(path, fixed, moving, unit="um")
    np.testing.assert_allclose(read_explorer_keypoints(path, fixed_unit="um")[0], fixed)
    with pytest.raises(InputError, match=r"fixed_unit.*morphology_px or um.*pixels"):
        read_explorer_keypoints(path, fixed_unit="pixels")


HAND_MADE_ALIGNMENT = np.array(
    [  # H&E px -> morphology px: rotation by 0.2 rad, ×2.4, shift
        [2.4 * np.cos(0.2), -2.4 * np.sin(0.2), 310.5],
        [2.4 * np.sin(0.2), 2.4 * np.cos(0.2), -42.25],
        [0.0, 0.0, 1.0],
    ]
)


@pytest.mark.parametrize("header", [False, True])
def test_alignment_file_round_trip(tmp_path, header: bool) -> None:
    path = tmp_path / "he_imagealignment.csv"
    lines = ["a,b,c"] if header else []
    lines += [",".join(f"{v:.17g}" for v in row) for row in HAND_MADE_ALIGNMENT]
    path.write_text("\n".join(lines) + "\n")
    matrix = read_explorer_alignment(path)
    np.testing.assert_array_equal(matrix, HAND_MADE_ALIGNMENT)
    he_px = np.random.default_rng(12).uniform(0, 5000, size=(50, 2))
    xenium_um = apply_transform(HAND_MADE_ALIGNMENT, he_px) * 0.2125  # morphology px -> µm
    registration = Registration.from_alignment(matrix, xenium_pixel_size_um=0.2125)
    np.testing.assert_allclose(registration.map(xenium_um), he_px, atol=1e-8)
    np.testing.assert_allclose(registration.inverse_map(he_px), xenium_um, atol=1e-8)
    assert registration.he_um_per_px == pytest.approx(2.4 * 0.2125)


# ---- bad input: one clear error naming the file -------------------------------------------------

BAD_KEYPOINT_FILES = {
    "fewer than 3 pairs": ("fixedX,fixedY,alignmentX,alignmentY\n1,2,3,4\n5,6,7,9\n", "at least 3"),
    "collinear points": ("fixedX,fixedY,alignmentX,alignmentY\n0,0,0,0\n1,1,2,2\n2,2,4,4\n3,3,6,6\n", "collinear"),
    "NaN": ("fixedX,fixedY,alignmentX,alignmentY\n0,0,0,0\n1,,2,2\n5,1,4,9\n3,7,6,6\n", r"\[fixedY\].*NaN"),
    "text": ("fixedX,fixedY,alignmentX,alignmentY\n0,0,0,0\n1,x,2,2\n5,1,4,9\n3,7,6,6\n", r"\[fixedY\].*non-numeric"),
    "wrong columns": (
        "x,y,alignmentX,alignmentY\n0,0,0,0\n1,3,2,2\n5,1,4,9\n",
        r"missing fixedX,fixedY; found x,y,alignmentX",
    ),
    "empty": ("", "columns fixedX"),
}


@pytest.mark.parametrize("case", list(BAD_KEYPOINT_FILES))
def test_bad_keypoint_files(tmp_path, case: str) -> None:
    text, message = BAD_KEYPOINT_FILES[case]
    path = tmp_path / f"bad_{case.replace(' ', '_')}.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        Registration.from_keypoints(*read_explorer_keypoints(path), source=path)
    assert path.name in str(caught.value)


def test_bad_point_arrays_name_the_source() -> None:
    fixed, moving = keypoints(6, noise_px=0.0, seed=13)
    with pytest.raises(InputError, match=r"run1/keypoints.csv.*same number of points.*6 and 5"):
        Registration.from_keypoints(fixed, moving[:5], source="run1/keypoints.csv")
    moving[2, 1] = np.inf
    with pytest.raises(InputError, match=r"run1/keypoints.csv.*finite"):
        fit_transform(fixed, moving, source="run1/keypoints.csv")
    with pytest.raises(InputError, match=r"run1/keypoints.csv.*he_um_per_px"):
        Registration.global_fit(fixed, fixed, scale=False, source="run1/keypoints.csv")


BAD_ALIGNMENTS = {
    "not invertible": ("1,2,3\n2,4,5\n0,0,1\n", "invertible"),
    "not 3x3": ("1,0,3\n0,1,5\n", "3x3"),
    "last row": ("1,0,3\n0,1,5\n0,0.5,1\n", "last row"),
    "ragged": ("1,0,3\n0,1\n0,0,1\n", "3x3"),
    "text": ("1,0,3\n0,one,5\n0,0,1\n", "numbers"),
}


@pytest.mark.parametrize("case", list(BAD_ALIGNMENTS))
def test_bad_alignment_files(tmp_path, case: str) -> None:
    text, message = BAD_ALIGNMENTS[case]
    path = tmp_path / f"align_{case.replace(' ', '_')}.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        read_explorer_alignment(path)
    assert path.name in str(caught.value)


# ---- saving, overlay, bundle step ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options", [{}, {"regions": 5}, {"regions": 5, "blend": True}, {"scale": False, "he_um_per_px": HE_UM_PER_PX}]
)
def test_json_round_trip_maps_identically(tmp_path, options: dict) -> None:
    fixed, moving = keypoints(60, noise_px=1.0, seed=14, deformed=True)
    registration = Registration.from_keypoints(fixed, moving, **options)
    loaded = Registration.from_json(registration.to_json(tmp_path / "registration.json"))
    points = np.random.default_rng(15).uniform(0, SLIDE_UM, size=(300, 2))
    np.testing.assert_array_equal(loaded.map(points), registration.map(points))
    assert loaded.report() == registration.report()


def write_slide(path, height_px: int = 1400, width_px: int = 1500) -> None:
    """A small RGB OME-TIFF at HE_UM_PER_PX: pink tissue with darker spots where the cells are, glass around."""
    rng = np.random.default_rng(16)
    image = np.full((height_px, width_px, 3), 245, dtype=np.uint8)  # glass
    corners_px = small_bundle_map(np.array([[-20.0, -20.0], [620.0, -20.0], [620.0, 620.0], [-20.0, 620.0]]))
    rows, cols = skdraw.polygon(corners_px[:, 1], corners_px[:, 0], shape=(height_px, width_px))
    image[rows, cols] = (235, 180, 210)
    spots = np.zeros((height_px, width_px), dtype=bool)
    spots[rows, cols] = rng.random(len(rows)) < 0.02
    image[spots] = (90, 40, 140)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        path,
        image,
        photometric="rgb",
        tile=(256, 256),
        metadata={"axes": "YXS", "PhysicalSizeX": HE_UM_PER_PX, "PhysicalSizeY": HE_UM_PER_PX},
    )


def small_bundle_map(xy_um: np.ndarray) -> np.ndarray:
    """The bundle's planted µm -> px map: keeps a 600 µm tissue inside a 1500 px slide."""
    matrix = np.eye(3)
    matrix[:2, :2] = rotation(0.1) / HE_UM_PER_PX
    matrix[:2, 2] = (200.0, 80.0)
    return apply_transform(matrix, xy_um)


def make_bundle(root, noise_px: float = 1.0):
    rng = np.random.default_rng(17)
    write_slide(root / "he" / "post_xenium_he.ome.tif")
    fixed = rng.uniform(20, 580, size=(24, 2))
    write_keypoints_csv(
        root / "he" / "keypoints.csv", fixed, small_bundle_map(fixed) + rng.normal(0, noise_px, (24, 2))
    )
    cells = rng.uniform(0, 600, size=(3000, 2))
    pq.write_table(
        pa.table(
            {"cell_id": [f"cell{i}-1" for i in range(3000)], "x_centroid": cells[:, 0], "y_centroid": cells[:, 1]}
        ),
        root / "cells.parquet",
    )


def test_overlay_is_a_png(tmp_path) -> None:
    from data_shards.slide import Slide

    make_bundle(tmp_path)
    fixed, moving = read_explorer_keypoints(tmp_path / "he" / "keypoints.csv")
    registration = Registration.from_keypoints(fixed, moving, regions=3)
    cells = pq.read_table(tmp_path / "cells.parquet").to_pandas()[["x_centroid", "y_centroid"]].to_numpy()
    with Slide(tmp_path / "he" / "post_xenium_he.ome.tif") as slide:
        out = write_overlay(tmp_path / "overlay.png", registration, slide, cells, max_side=512)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000
    with Image.open(out) as picture:
        assert min(picture.size) > 500
        pixels = np.asarray(picture.convert("RGB")).astype(np.uint32)
    colours = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    assert len(np.unique(colours)) > 50  # thumbnail, dots and arrows, not a blank canvas
    assert not list(tmp_path.glob(".*partial"))


def test_register_bundle_end_to_end(tmp_path, capsys) -> None:
    bundle = tmp_path / "bundle"
    make_bundle(bundle)
    report = register_bundle(bundle, tmp_path / "out", {"n_regions": 2, "blend": True, "max_rms_um": 2.0})
    assert report["n_regions"] == 2 and report["overall"]["rms_um"] < 2.0
    assert report["he_um_per_px_slide"] == pytest.approx(HE_UM_PER_PX)
    for name in ("registration.json", "registration_report.json", "registration_overlay.png", "register_config.yaml"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "loo rms" in capsys.readouterr().out
    loaded = Registration.from_json(tmp_path / "out" / "registration.json")
    cells = np.random.default_rng(18).uniform(50, 550, size=(400, 2))
    assert rms_um(loaded.map(cells), small_bundle_map(cells)) < 1.0
    assert json.loads((tmp_path / "out" / "registration_report.json").read_text())["overall"] == report["overall"]

    # `make_shards.py register` (config file + key=value overrides) reaches the same function; a rigid
    # fit uses the slide's µm/px.
    config = tmp_path / "data.yaml"
    config.write_text(f"out_dir: {tmp_path / 'shards'}\nslides:\n  - id: b\n    bundle: {bundle}\n")
    cfg = load_config(config, ["register.scale=false", "register.max_loo_um=5"], schema=DataConfig)
    rigid = run_make_shards("register", cfg)["b"]
    assert rigid["scale"] is False and rigid["overall"]["rms_um"] < 2.0
    assert (tmp_path / "shards" / "registration" / "b" / "registration.json").is_file()


def test_register_bundle_refuses_before_writing(tmp_path) -> None:
    bundle = tmp_path / "bundle"
    make_bundle(bundle, noise_px=30.0)
    with pytest.raises(RegistrationError, match=r"keypoints.csv \[region 0\]"):
        register_bundle(bundle, tmp_path / "out", {"max_rms_um": 1.0})
    assert not (tmp_path / "out").exists()


def test_register_bundle_from_alignment(tmp_path) -> None:
    bundle = tmp_path / "bundle"
    make_bundle(bundle, noise_px=0.0)
    # The exact inverse of the planted map, written as Xenium Explorer's H&E px -> morphology px.
    um_to_px = np.eye(3)
    um_to_px[:2, :2] = rotation(0.1) / HE_UM_PER_PX
    um_to_px[:2, 2] = (200.0, 80.0)
    he_px_to_morph_px = np.diag([1 / 0.2125, 1 / 0.2125, 1.0]) @ np.linalg.inv(um_to_px)
    (bundle / "he" / "he_imagealignment.csv").write_text(
        "\n".join(",".join(f"{v:.17g}" for v in row) for row in he_px_to_morph_px) + "\n"
    )
    report = register_bundle(bundle, tmp_path / "out", {"alignment": "he/he_imagealignment.csv"})
    assert report["overall"]["n_keypoints"] == 24 and report["overall"]["rms_um"] < 1e-6
    assert report["overall"]["loo_rms_um"] is None  # nothing was fitted

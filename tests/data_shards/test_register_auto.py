"""``register.keypoints: auto``: keypoints found between the Xenium DAPI image and the H&E.

Small procedural bundles (their DAPI image rendered from the same nuclei as the H&E) and the planted
Xenium µm -> H&E px map as the truth: the automatic route must land the cells about as well as the
hand-keypoint route, refuse a DAPI image of another bundle, and report a mirrored H&E as mirrored.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.errors import InputError
from data_shards.ome_tiff import write_pyramidal_ome_tiff
from data_shards.register import (
    AUTO_KEYPOINTS_FILE,
    Registration,
    RegistrationError,
    find_morphology_image,
    read_explorer_keypoints,
    register_bundle,
    write_explorer_keypoints,
)
from data_shards.slide import Slide
from data_shards.synthetic import DEFAULT_SLIDE, make_bundle

# Fewer tiles than the default 100 keep each automatic run to a few seconds on a small bundle.
FAST = {"auto_max_keypoints": 20, "n_regions": 2, "blend": True}
MORPHOLOGY = "morphology_focus/morphology_focus_0000.ome.tif"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("auto") / "bundle"
    make_bundle(out, "procedural", n_cells=800, seed=3, write_transcripts=False)
    return out


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("auto_other") / "bundle"
    make_bundle(out, "procedural", n_cells=800, seed=8, write_transcripts=False)
    return out


def cell_error_um(bundle_dir: Path, registration: Registration, mirror_width_px: int | None = None) -> float:
    """RMS distance (µm) between where the registration sends each cell and where the planted map put it."""
    truth = pd.read_parquet(bundle_dir / "ground_truth_cells.parquet")
    true_px = truth[["he_x_px", "he_y_px"]].to_numpy()
    if mirror_width_px is not None:  # the H&E was mirrored: x -> width - 1 - x
        true_px[:, 0] = mirror_width_px - 1 - true_px[:, 0]
    mapped = registration.map(truth[["x_um", "y_um"]].to_numpy())
    return float(np.sqrt(np.mean(np.sum((mapped - true_px) ** 2, axis=1))) * registration.he_um_per_px)


def test_auto_route_lands_cells_as_well_as_hand_keypoints(bundle, tmp_path) -> None:
    register_bundle(bundle, tmp_path / "hand", FAST)
    report = register_bundle(bundle, tmp_path / "auto", {**FAST, "keypoints": "auto"})
    hand = cell_error_um(bundle, Registration.from_json(tmp_path / "hand" / "registration.json"))
    auto_registration = Registration.from_json(tmp_path / "auto" / "registration.json")
    auto = cell_error_um(bundle, auto_registration)
    assert auto <= 1.5 * hand, (auto, hand)
    assert auto < 2.0  # µm; a map off by one nucleus would be ~8 µm
    found = report["auto_keypoints"]
    assert found["mirrored"] is False and found["n_kept"] >= 8
    assert abs(found["he_um_per_px_fitted"] / 0.5 - 1) < 0.02
    # auto_keypoints.csv is Explorer's format: the reader gives back the pairs the registration was fitted on.
    fixed, moving = read_explorer_keypoints(tmp_path / "auto" / AUTO_KEYPOINTS_FILE)
    fitted_fixed = np.vstack([r.fixed_um for r in auto_registration.regions])
    fitted_moving = np.vstack([r.moving_px for r in auto_registration.regions])
    order = np.lexsort(fixed.T), np.lexsort(fitted_fixed.T)
    np.testing.assert_allclose(fixed[order[0]], fitted_fixed[order[1]], atol=1e-5)
    np.testing.assert_allclose(moving[order[0]], fitted_moving[order[1]], atol=1e-5)
    assert auto_registration.identity["inputs"]["morphology_image"]["file"].endswith(MORPHOLOGY)


def test_dapi_of_another_bundle_is_refused(bundle, other_bundle, tmp_path) -> None:
    foreign = bundle / "he" / "foreign_dapi.ome.tif"
    shutil.copyfile(other_bundle / MORPHOLOGY, foreign)
    out = tmp_path / "reg"
    try:
        with pytest.raises(RegistrationError) as caught:
            register_bundle(bundle, out, {**FAST, "keypoints": "auto", "morphology_image": "he/foreign_dapi.ome.tif"})
    finally:
        foreign.unlink()
    message = str(caught.value)
    assert "foreign_dapi.ome.tif" in message and "post_xenium_he.ome.tif" in message, message
    assert "DAPI image of this section" in message, message
    assert not out.exists()  # nothing written


def test_implausible_scale_is_refused_naming_both_images(bundle, tmp_path) -> None:
    # The slide says 0.65 µm/px where it has 0.5: the images, resampled in µm, no longer agree.
    with pytest.raises(RegistrationError) as caught:
        register_bundle(bundle, tmp_path / "reg", {**FAST, "keypoints": "auto", "he_um_per_px": 0.65})
    message = str(caught.value)
    assert MORPHOLOGY in message and "post_xenium_he.ome.tif" in message, message
    assert not (tmp_path / "reg").exists()


def write_mirrored_slide(source: Path, target: Path) -> int:
    """The same H&E, x flipped, as a pyramidal OME-TIFF; returns its width (px)."""
    with Slide(source) as slide:
        rgb = slide.read_region(0, 0, slide.shape[1], slide.shape[0])[:, ::-1]
        um_per_px = slide.um_per_px
    levels = [np.ascontiguousarray(rgb)]

    def tiles(level: int, shape: tuple[int, int]):
        while len(levels) <= level:
            prev = levels[-1]
            h, w = prev.shape[0] // 2, prev.shape[1] // 2
            levels.append(prev[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
        image = levels[level][: shape[0], : shape[1]]
        for y0 in range(0, shape[0], 512):
            for x0 in range(0, shape[1], 512):
                tile = np.full((512, 512, 3), 255, np.uint8)
                block = image[y0 : y0 + 512, x0 : x0 + 512]
                tile[: block.shape[0], : block.shape[1]] = block
                yield tile

    write_pyramidal_ome_tiff(target, rgb.shape[:2], um_per_px, tiles, tile_px=512, progress=False)
    return rgb.shape[1]


def test_mirrored_he_is_reported_and_registered_when_declared(bundle, tmp_path) -> None:
    mirrored = bundle / "he" / "mirrored.ome.tif"
    width = write_mirrored_slide(bundle / "he" / "post_xenium_he.ome.tif", mirrored)
    settings = {**FAST, "keypoints": "auto", "he_slide": "he/mirrored.ome.tif"}
    try:
        with pytest.raises(RegistrationError) as caught:
            register_bundle(bundle, tmp_path / "refused", settings)
        message = str(caught.value)
        assert "mirror image" in message and "register.he_mirrored=true" in message, message
        assert not (tmp_path / "refused").exists()
        report = register_bundle(bundle, tmp_path / "flipped", {**settings, "he_mirrored": True})
    finally:
        mirrored.unlink()
    assert report["auto_keypoints"]["mirrored"] is True and report["he_mirrored"] is True
    registration = Registration.from_json(tmp_path / "flipped" / "registration.json")
    assert registration.mirror_x and np.linalg.det(registration.global_transform[:2, :2]) < 0
    assert cell_error_um(bundle, registration, mirror_width_px=width) < 2.0
    # Control: the same map without the reflection lands nowhere near the cells.
    registration.regions = [r for r in registration.regions[:1]]
    registration.regions[0].transform = registration.regions[0].transform @ np.diag([-1.0, 1.0, 1.0])
    assert cell_error_um(bundle, registration, mirror_width_px=width) > 20.0


def test_explorer_keypoints_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    fixed, moving = rng.uniform(0, 3000, (12, 2)), rng.uniform(0, 9000, (12, 2))
    path = write_explorer_keypoints(tmp_path / AUTO_KEYPOINTS_FILE, fixed, moving, pixel_size_um=0.2125)
    header = path.read_text().splitlines()[0]
    assert header == "fixedX,fixedY,alignmentX,alignmentY"
    back_fixed, back_moving = read_explorer_keypoints(path, pixel_size_um=0.2125)
    np.testing.assert_allclose(back_fixed, fixed, atol=1e-5)
    np.testing.assert_allclose(back_moving, moving, atol=1e-6)
    # fixedX is in morphology pixels, not µm: read as µm it is 1 / 0.2125 times larger.
    as_um, _ = read_explorer_keypoints(path, fixed_unit="um")
    np.testing.assert_allclose(as_um, fixed / 0.2125, rtol=1e-6)


def test_bundle_without_dapi_image_is_refused_by_name(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    with pytest.raises(InputError, match="DAPI morphology image"):
        find_morphology_image(tmp_path / "b")
    with pytest.raises(InputError, match="register.morphology_image"):
        find_morphology_image(tmp_path / "b", "nope.ome.tif")


@pytest.mark.slow
def test_demo_bundle_auto_route_within_1p5x_of_hand_route(tmp_path) -> None:
    if not DEFAULT_SLIDE.is_file():
        pytest.skip(f"demo slide not fetched yet ({DEFAULT_SLIDE}); run `make setup`")
    demo = tmp_path / "demo"
    make_bundle(demo, "real", seed=0, write_transcripts=False)
    settings = {"n_regions": 4, "blend": True, "max_rms_um": 5.0, "max_loo_um": 10.0}
    register_bundle(demo, tmp_path / "hand", settings)
    report = register_bundle(demo, tmp_path / "auto", {**settings, "keypoints": "auto"})
    hand = cell_error_um(demo, Registration.from_json(tmp_path / "hand" / "registration.json"))
    auto = cell_error_um(demo, Registration.from_json(tmp_path / "auto" / "registration.json"))
    assert auto <= 1.5 * hand, (auto, hand)
    assert report["auto_keypoints"]["seconds"] < 60.0

"""Registration of bundles as users bring them: Explorer's keypoint units, and the checks that refuse a wrong map.

Small procedural bundles (``make_bundle(..., "procedural")``, no local deformation so one similarity
is the truth) whose keypoints and alignment matrix are written as Xenium Explorer writes them:
``fixedX, fixedY`` in morphology pixels, the matrix H&E px -> morphology px. Each wrong input must
be refused by ``register_bundle`` (or the shard build) with one error naming the file and the
likely cause, before anything is written.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from common.config import load_config
from data_shards.register import (
    Registration,
    RegistrationError,
    check_bundle_identity,
    register_bundle,
)
from data_shards.schema import DataConfig
from data_shards.stages import run_make_shards
from data_shards.synthetic import make_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Two procedural bundles (seeds 1 and 2): the slide under test and "another slide"."""
    root = tmp_path_factory.mktemp("bundles")
    made = {}
    for name, seed in (("a", 1), ("b", 2)):
        truth = make_bundle(root / name, "procedural", n_cells=600, seed=seed, deformation_um=0.0, n_keypoints=30)
        made[name] = (root / name, truth)
    return made


@pytest.fixture
def bundle_a(bundles, tmp_path):
    """A private copy of bundle a (tests add files to it)."""
    source, truth = bundles["a"]
    shutil.copytree(source, tmp_path / "a")
    return tmp_path / "a", truth


def centre_error_px(registration: Registration, bundle) -> np.ndarray:
    """(n_cells,) distance in H&E px between each mapped cell centre and its planted position."""
    cells = pd.read_parquet(bundle / "ground_truth_cells.parquet")
    mapped = registration.map(cells[["x_um", "y_um"]].to_numpy())
    return np.linalg.norm(mapped - cells[["he_x_px", "he_y_px"]].to_numpy(), axis=1)


def rewrite_keypoints(bundle, name: str, transform) -> str:
    """Write he/<name>: the bundle's keypoints table passed through ``transform(frame) -> frame``."""
    frame = pd.read_csv(bundle / "he" / "keypoints.csv")
    transform(frame).to_csv(bundle / "he" / name, index=False)
    return f"he/{name}"


# ---- Explorer's units, by both routes, with no unit setting -----------------------------------


def test_explorer_keypoints_are_in_morphology_pixels(bundle_a) -> None:
    bundle, truth = bundle_a
    keypoints = pd.read_csv(bundle / "he" / "keypoints.csv")
    cells = pd.read_parquet(bundle / "cells.parquet")
    # As in real Explorer exports: × pixel_size lands in the µm frame of the cells; raw values are 4.7× larger.
    fixed_um = keypoints[["fixedX", "fixedY"]].to_numpy() * truth["xenium_pixel_size_um"]
    assert fixed_um.max() <= cells[["x_centroid", "y_centroid"]].to_numpy().max() + 5.0
    assert keypoints["fixedY"].max() > 3 * cells["y_centroid"].max()


@pytest.mark.parametrize("route", ["keypoints", "alignment"])
def test_both_routes_centre_cells_within_two_pixels(bundle_a, tmp_path, route: str) -> None:
    bundle, truth = bundle_a
    cfg = {"alignment": "he/he_imagealignment.csv"} if route == "alignment" else {}
    report = register_bundle(bundle, tmp_path / "out", cfg)
    registration = Registration.from_json(tmp_path / "out" / "registration.json")
    error = centre_error_px(registration, bundle)
    assert error.max() < 2.0, f"{route}: max {error.max():.2f} px"
    assert report["he_um_per_px_keypoints"] == pytest.approx(truth["he_um_per_px"], rel=0.02)
    assert report["on_tissue_fraction"] > 0.9
    if route == "alignment":  # both fits reported; the keypoints agree with the matrix
        assert report["he_um_per_px_alignment"] == pytest.approx(truth["he_um_per_px"], rel=1e-6)
        assert report["overall"]["rms_um"] < 2.0


def test_old_micron_reading_of_an_explorer_file_is_refused(bundle_a, tmp_path) -> None:
    """Control: reading Explorer's pixels as µm (the old behaviour) fits 4.7× the slide's µm/px."""
    bundle, _ = bundle_a
    with pytest.raises(
        RegistrationError, match=r"keypoints.csv \[µm/px\].*fitted 2\.\d+ µm/px.*0\.5 in the slide"
    ) as e:
        register_bundle(bundle, tmp_path / "out", {"keypoints_fixed_unit": "um"})
    assert "morphology pixels" in str(e.value) and "keypoints_fixed_unit=morphology_px" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_micron_keypoints_from_other_tools(bundle_a, tmp_path) -> None:
    """A file with fixedX/fixedY in µm is refused by default (naming the key to set) and read right with it."""
    bundle, truth = bundle_a
    pixel = truth["xenium_pixel_size_um"]
    name = rewrite_keypoints(
        bundle, "keypoints_um.csv", lambda f: f.assign(fixedX=f.fixedX * pixel, fixedY=f.fixedY * pixel)
    )
    with pytest.raises(RegistrationError, match=r"keypoints_um.csv \[µm/px\].*in µm.*keypoints_fixed_unit=um"):
        register_bundle(bundle, tmp_path / "out", {"keypoints": name})
    assert not (tmp_path / "out").exists()
    register_bundle(bundle, tmp_path / "out", {"keypoints": name, "keypoints_fixed_unit": "um"})
    assert centre_error_px(Registration.from_json(tmp_path / "out" / "registration.json"), bundle).max() < 2.0


# ---- wrong registrations refused, nothing written ----------------------------------------------


def test_keypoints_from_another_bundle_are_refused(bundles, bundle_a, tmp_path) -> None:
    bundle, _ = bundle_a
    shutil.copy(bundles["b"][0] / "he" / "keypoints.csv", bundle / "he" / "keypoints_b.csv")
    # Scale and RMS look right (same scanner, same kind of tissue): only where the cells land tells.
    with pytest.raises(RegistrationError, match=r"keypoints_b.csv \[cells on tissue\].*another slide"):
        register_bundle(bundle, tmp_path / "out", {"keypoints": "he/keypoints_b.csv"})
    assert not (tmp_path / "out").exists()


def test_alignment_from_another_bundle_is_refused(bundles, bundle_a, tmp_path) -> None:
    bundle, _ = bundle_a
    shutil.copy(bundles["b"][0] / "he" / "he_imagealignment.csv", bundle / "he" / "alignment_b.csv")
    (bundle / "he" / "keypoints.csv").unlink()  # the matrix alone: nothing to compare it with but the tissue
    with pytest.raises(RegistrationError, match=r"alignment_b.csv \[cells on tissue\].*another slide"):
        register_bundle(bundle, tmp_path / "out", {"alignment": "he/alignment_b.csv"})
    assert not (tmp_path / "out").exists()


SWAPS = {
    "fixed and alignment columns": (
        lambda f: f.rename(
            columns={"fixedX": "alignmentX", "fixedY": "alignmentY", "alignmentX": "fixedX", "alignmentY": "fixedY"}
        ),
        r"\[µm/px\].*fixed \(Xenium\) and alignment \(H&E\) columns swapped",
    ),
    "X and Y columns": (
        lambda f: f.rename(columns={"fixedX": "fixedY", "fixedY": "fixedX"}),
        r"\[µm/px\].*swapped or mirrored columns",
    ),
}


@pytest.mark.parametrize("case", list(SWAPS))
def test_swapped_columns_are_refused(bundle_a, tmp_path, case: str) -> None:
    bundle, _ = bundle_a
    transform, message = SWAPS[case]
    name = rewrite_keypoints(bundle, "keypoints_swapped.csv", transform)
    with pytest.raises(RegistrationError, match=r"keypoints_swapped.csv " + message):
        register_bundle(bundle, tmp_path / "out", {"keypoints": name})
    assert not (tmp_path / "out").exists()


def test_um_per_px_four_times_off_is_refused(bundle_a, tmp_path) -> None:
    """H&E points taken on pyramid level 2 (4× reduced): the fit says 2.0 µm/px against the slide's 0.5."""
    bundle, _ = bundle_a
    name = rewrite_keypoints(
        bundle, "keypoints_level2.csv", lambda f: f.assign(alignmentX=f.alignmentX / 4, alignmentY=f.alignmentY / 4)
    )
    with pytest.raises(
        RegistrationError, match=r"keypoints_level2.csv \[µm/px\].*fitted (1\.99|2\.0)\d* µm/px.*close to 4"
    ):
        register_bundle(bundle, tmp_path / "out", {"keypoints": name})
    # The slide's metadata 4× off instead: the same check, the same hint, with the override named.
    with pytest.raises(RegistrationError, match=r"keypoints.csv \[µm/px\].*vs 2 in the slide.*he_um_per_px"):
        register_bundle(bundle, tmp_path / "out", {"he_um_per_px": 2.0})
    assert not (tmp_path / "out").exists()


def test_keypoints_and_matrix_together_blame_the_one_that_disagrees(bundle_a, tmp_path) -> None:
    bundle, truth = bundle_a
    pixel = truth["xenium_pixel_size_um"]
    both = {"alignment": "he/he_imagealignment.csv"}
    # Keypoints in µm, matrix right: the keypoints file is named, the matrix quoted as agreeing.
    name = rewrite_keypoints(
        bundle, "keypoints_um.csv", lambda f: f.assign(fixedX=f.fixedX * pixel, fixedY=f.fixedY * pixel)
    )
    with pytest.raises(
        RegistrationError,
        match=r"keypoints_um.csv \[µm/px\].*from the keypoints.*alignment gives 0\.5\d* µm/px, which agrees",
    ):
        register_bundle(bundle, tmp_path / "out", {**both, "keypoints": name})
    # Matrix mapping H&E px to µm (not Explorer's morphology px), keypoints right: the matrix is named.
    matrix = np.loadtxt(bundle / "he" / "he_imagealignment.csv", delimiter=",")
    np.savetxt(bundle / "he" / "alignment_um.csv", np.diag([pixel, pixel, 1.0]) @ matrix, delimiter=",")
    with pytest.raises(
        RegistrationError,
        match=r"alignment_um.csv \[µm/px\].*from the alignment.*keypoints gives 0\.\d+ µm/px, which agrees.*µm rather than",
    ):
        register_bundle(bundle, tmp_path / "out", {"alignment": "he/alignment_um.csv"})
    assert not (tmp_path / "out").exists()


# ---- the bundle a registration belongs to ------------------------------------------------------


def build_config(tmp_path, bundle, registration=None):
    slide = {"id": "a", "bundle": str(bundle)}
    if registration is not None:
        slide["registration"] = str(registration)
    text = json.dumps({"out_dir": str(tmp_path / "shards"), "slides": [slide], "progress": False})
    (tmp_path / "data.yaml").write_text(text)  # JSON is YAML
    return load_config(tmp_path / "data.yaml", [], schema=DataConfig)


def test_registration_records_its_bundle(bundle_a, tmp_path) -> None:
    bundle, _ = bundle_a
    register_bundle(bundle, tmp_path / "out", {"alignment": "he/he_imagealignment.csv"})
    identity = json.loads((tmp_path / "out" / "registration.json").read_text())["bundle"]
    assert identity["bundle_dir"] == str(bundle.resolve())
    assert identity["run_name"] == "synthetic" and identity["region_name"] == "synthetic_seed1"
    assert identity["cells"]["file"] == "cells.parquet" and len(identity["cells"]["sha256"]) == 64
    assert set(identity["inputs"]) == {"keypoints", "alignment"}
    check_bundle_identity(identity, bundle, "registration.json")  # its own bundle: accepted


def test_registration_json_from_another_bundle_is_refused_when_sharding(bundles, bundle_a, tmp_path) -> None:
    bundle, _ = bundle_a
    register_bundle(bundles["b"][0], tmp_path / "reg_b", {})
    cfg = build_config(tmp_path, bundle, tmp_path / "reg_b" / "registration.json")
    with pytest.raises(
        Exception, match=r"reg_b/registration.json \[bundle\].*synthetic_seed1.*synthetic_seed2.*another bundle"
    ) as e:
        run_make_shards("build", cfg)
    assert type(e.value).__name__ == "InputError"
    assert not (tmp_path / "shards").exists()  # refused before the config copy, vocabulary or shards


def test_identity_rules(bundles, bundle_a, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    bundle, _ = bundle_a
    register_bundle(bundle, tmp_path / "out", {})
    saved = Registration.from_json(tmp_path / "out" / "registration.json").identity
    # An old registration.json (no identity): accepted, with a warning saying the check could not run.
    data = json.loads((tmp_path / "out" / "registration.json").read_text())
    del data["bundle"]
    assert Registration.from_dict(data).identity is None
    with caplog.at_level(logging.WARNING, logger="data_shards.register"):
        check_bundle_identity(None, bundle, "old/registration.json")
    assert "records no bundle identity" in caplog.text
    # The same run and region re-segmented (new cells table): accepted with a warning.
    caplog.clear()
    changed = dict(saved, cells={"file": "cells.parquet", "sha256": "0" * 64})
    with caplog.at_level(logging.WARNING, logger="data_shards.register"):
        check_bundle_identity(changed, bundle, "registration.json")
    assert "changed since it was registered" in caplog.text
    # Another run or region with other cells: refused.
    with pytest.raises(Exception, match=r"another bundle"):
        check_bundle_identity(dict(changed, region_name="elsewhere"), bundle, "registration.json")


def test_bundle_with_cells_csv_only_registers(bundle_a, tmp_path) -> None:
    bundle, _ = bundle_a
    cells = pd.read_parquet(bundle / "cells.parquet")
    cells.to_csv(bundle / "cells.csv.gz", index=False)
    (bundle / "cells.parquet").unlink()
    report = register_bundle(bundle, tmp_path / "out", {})
    assert report["on_tissue_fraction"] > 0.9
    identity = Registration.from_json(tmp_path / "out" / "registration.json").identity
    assert identity["cells"]["file"] == "cells.csv.gz"


def test_unknown_keypoint_unit_is_refused(bundle_a, tmp_path) -> None:
    bundle, _ = bundle_a
    with pytest.raises(Exception, match=r"register.keypoints_fixed_unit.*'morphology_px' or 'um'.*pixels"):
        register_bundle(bundle, tmp_path / "out", {"keypoints_fixed_unit": "pixels"})
    assert not (tmp_path / "out").exists()

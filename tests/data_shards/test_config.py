"""The data config schema: the demo loads as written, misspelled keys and wrong types are refused
(with the key and the closest valid one named) before any file is written, by every entry point."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.config import apply_schema, load_config
from common.errors import InputError
from data_shards import pipeline
from data_shards.register import register_bundle
from data_shards.schema import BundleConfig, DataConfig, RegisterConfig, slide_register_config
from data_shards.stages import SHARD_COMMANDS, run_make_bundle, run_make_shards
from data_shards.synthetic import make_bundle
from tests.support import assert_refused, assert_subset, run_launch

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "data" / "demo.yaml"


# ------------------------------------------------------------------ the schema


def test_demo_config_loads_unchanged_with_every_default_filled():
    cfg = load_config(DEMO, [], schema=DataConfig)
    assert_subset(OmegaConf.to_container(OmegaConf.load(DEMO), resolve=True), OmegaConf.to_container(cfg, resolve=True))
    assert cfg.bundle.out_dir == "runs/demo/bundle" and cfg.slides[0].meta.patient == "P01"
    assert cfg.register.n_regions == 4 and cfg.register.min_points_per_region == 4  # a default filled in
    assert cfg.crop.size_px == 224 and cfg.qc.tissue_thumbnail_px == 2048
    # Checking again changes nothing (run functions call apply_schema on a loaded config).
    assert apply_schema(DataConfig, cfg) == cfg


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("crop.sise=64", "crop.sise", "crop.size_px"),
        ("register.n_regoins=3", "register.n_regoins", "register.n_regions"),
        ("bundle.n_keypionts=3", "bundle.n_keypionts", "bundle.n_keypoints"),
        ("slides=[{id: s1, bundel: somewhere}]", "slides[0].bundel", "slides[0].bundle"),
    ],
)
def test_misspelled_keys_are_refused_with_the_closest_key(override, key, suggestion):
    with pytest.raises(InputError, match=r"did you mean") as error:
        load_config(DEMO, [override], schema=DataConfig)
    assert key in str(error.value) and f"`{suggestion}`" in str(error.value)


@pytest.mark.parametrize(
    "override, key, type_name",
    [
        ("qc.min_genes=ten", "qc.min_genes", "int"),
        ("register.blend=maybe", "register.blend", "bool"),
        ("neighbours.radius_um=far", "neighbours.radius_um", "float"),
    ],
)
def test_wrong_types_are_refused_naming_the_key_and_type(override, key, type_name):
    with pytest.raises(InputError) as error:
        load_config(DEMO, [override], schema=DataConfig)
    assert key in str(error.value) and type_name in str(error.value)


def test_bundle_defaults_are_make_bundle_defaults():
    """The schema passes every key to make_bundle: its defaults must be the function's."""
    signature = inspect.signature(make_bundle).parameters
    for f in dataclasses.fields(BundleConfig):
        assert f.name in signature, f.name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.name == "out_dir":
            continue
        expected = signature[f.name].default
        assert (list(expected) if isinstance(expected, tuple) else expected) == default, f.name


def test_register_section_defaults_to_each_slides_he_slide():
    cfg = apply_schema(DataConfig, {"slides": [{"id": "a", "bundle": "b", "he_slide": "he/other.ome.tif"}]})
    assert slide_register_config(cfg.register, cfg.slides[0])["he_slide"] == "he/other.ome.tif"
    cfg = apply_schema(
        DataConfig,
        {
            "slides": [{"id": "a", "bundle": "b", "he_slide": "he/other.ome.tif"}],
            "register": {"he_slide": "he/mine.ome.tif"},
        },
    )
    assert slide_register_config(cfg.register, cfg.slides[0])["he_slide"] == "he/mine.ome.tif"
    settings = apply_schema(RegisterConfig, slide_register_config(cfg.register, cfg.slides[0]))
    assert settings.he_slide == "he/mine.ome.tif" and settings.max_rms_um == 10.0


def test_run_functions_check_what_they_are_given(tmp_path):
    """A dict from a test or a notebook is checked like a loaded config, before anything is written."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"crop\.size_px"):
        pipeline.build_shards({"out_dir": str(out), "slides": [{"id": "s", "bundle": "b"}], "crop": {"sise": 64}})
    with pytest.raises(InputError, match=r"n_regions"):
        register_bundle(tmp_path / "bundle", out, {"n_regoins": 2})
    with pytest.raises(InputError, match=r"bundle\.n_cells"):
        run_make_bundle({"bundle": {"out_dir": str(out), "n_cels": 10}})
    with pytest.raises(InputError, match=r"shards\.seed"):
        run_make_shards("merge", {"out_dir": str(out), "shards": {"sed": 1}})
    with pytest.raises(InputError, match=r"bundle\.out_dir"):
        run_make_bundle({"bundle": {"mode": "procedural"}})
    assert not out.exists()


# ------------------------------------------------------------------ the entry points


def test_make_bundle_refuses_a_misspelled_key(tmp_path):
    out = tmp_path / "bundle"
    result = run_launch("make_bundle.py", "--config", str(DEMO), f"bundle.out_dir={out}", "crop.sise=64")
    assert_refused(result, "crop.sise", "crop.size_px")
    result = run_launch("make_bundle.py", "--config", str(DEMO), f"bundle.out_dir={out}", "bundle.n_keypionts=3")
    assert_refused(result, "bundle.n_keypionts", "bundle.n_keypoints")
    assert not out.exists()


@pytest.mark.parametrize("command", SHARD_COMMANDS)
def test_make_shards_refuses_a_misspelled_key(command, tmp_path):
    out = tmp_path / "shards"
    args = ([] if command == "build" else [command]) + ["--config", str(DEMO), f"out_dir={out}", "crop.sise=64"]
    assert_refused(run_launch("make_shards.py", *args), "crop.sise", "crop.size_px")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_make_shards_refuses_a_misspelled_key_in_a_slide_entry(tmp_path):
    out = tmp_path / "shards"
    config = tmp_path / "data.yaml"
    config.write_text(
        f"out_dir: {out}\nslides:\n  - id: s1\n    bundle: {tmp_path / 'bundle'}\n"
        "    meta: {patient: P1}\n  - id: s2\n    bundle: elsewhere\n    registraton: r.json\n"
    )
    assert_refused(
        run_launch("make_shards.py", "register", "--config", str(config)),
        "slides[1].registraton",
        "slides[1].registration",
    )
    assert not out.exists()

"""common.config: typed schemas refuse unknown keys (with a suggestion) and wrong types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from omegaconf import OmegaConf

from common.config import apply_schema, load_config, save_config, schema_keys
from common.errors import InputError


@dataclass
class Crop:
    size_px: int = 224  # crop side, H&E px
    target_um_per_px: Optional[float] = None


@dataclass
class Slide:
    id: str = ""
    bundle: str = ""


@dataclass
class Checkpoint:
    every_steps: int = 1000


@dataclass
class Train:
    lr: float = 1e-3
    epochs: int = 10
    cpu_threads: Any = "auto"


@dataclass
class Schema:
    out_dir: str = "runs/x"
    crop: Crop = field(default_factory=Crop)
    train: Train = field(default_factory=Train)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    slides: list[Slide] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)  # open: checked by the model builder
    encoders: dict[str, Slide] = field(default_factory=dict)  # named records
    tags: list[str] = field(default_factory=list)


def test_defaults_filled_and_values_converted():
    cfg = apply_schema(Schema, {"crop": {"size_px": "64"}, "slides": [{"id": "S1"}]})
    assert cfg.crop.size_px == 64 and isinstance(cfg.crop.size_px, int)
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.checkpoint.every_steps == 1000
    assert cfg.slides[0].bundle == "" and cfg.slides[0].id == "S1"
    # A plain config: stages may add derived keys after the checks.
    cfg.derived = 1
    assert apply_schema(
        Schema, OmegaConf.masked_copy(cfg, [k for k in cfg if k != "derived"])
    ) == OmegaConf.masked_copy(cfg, [k for k in cfg if k != "derived"])


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ({"crop": {"sise": 64}}, "crop.sise", "crop.size_px"),
        ({"chekpoint": {"every_steps": 3}}, "chekpoint", "checkpoint"),
        ({"train": {"learning_rate": 5e-4}}, "train.learning_rate", "train.lr"),
        ({"slides": [{"id": "S1", "bundel": "x"}]}, "slides[0].bundel", "slides[0].bundle"),
        ({"encoders": {"past": {"bundel": "x"}}}, "encoders.past.bundel", "encoders.past.bundle"),
    ],
)
def test_unknown_key_named_with_closest_valid_key(override, key, suggestion):
    with pytest.raises(InputError) as info:
        apply_schema(Schema, override, source="demo.yaml")
    message = str(info.value)
    assert info.value.field == key and "unknown key" in message and message.startswith("demo.yaml")
    if suggestion:
        assert f"did you mean `{suggestion}`" in message
    section_keys = {"train.learning_rate": "lr, epochs, cpu_threads"}.get(key)
    if section_keys:
        assert section_keys in message


def test_unknown_leaf_found_anywhere_in_the_schema():
    with pytest.raises(InputError, match="did you mean `checkpoint.every_steps`"):
        apply_schema(Schema, {"every_step": 3})


def test_open_sections_accept_any_key():
    cfg = apply_schema(Schema, {"model": {"image": {"depth": 2}, "anything": [1, 2]}})
    assert cfg.model.image.depth == 2


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ({"train": {"epochs": "ten"}}, "train.epochs", "int"),
        ({"crop": {"target_um_per_px": "half"}}, "crop.target_um_per_px", "float"),
        ({"crop": 3}, "crop", None),
    ],
)
def test_wrong_type_names_key_and_type(override, key, expected):
    with pytest.raises(InputError) as info:
        apply_schema(Schema, override)
    assert info.value.field == key
    if expected:
        assert expected in str(info.value)


def test_load_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("crop:\n  size_px: 96\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["train.epochs=3", "out_dir=${crop.size_px}_run"], schema=Schema)
    assert (cfg.crop.size_px, cfg.train.lr, cfg.train.epochs, cfg.out_dir) == (96, 0.01, 3, "96_run")
    with pytest.raises(InputError, match="did you mean `crop.size_px`"):
        load_config(path, ["crop.sise=64"], schema=Schema)
    path.write_text("crop:\n  sise: 96\n")
    with pytest.raises(InputError) as info:
        load_config(path, [], schema=Schema)
    assert str(path) in str(info.value) and info.value.field == "crop.sise"


def test_overrides_reach_into_lists_and_replace_them_whole(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("slides:\n  - {id: a, bundle: b1}\n  - {id: c, bundle: b2}\n")
    cfg = load_config(path, ["slides.1.bundle=moved", "tags=[x, y]"], schema=Schema)
    assert [s.bundle for s in cfg.slides] == ["b1", "moved"] and list(cfg.tags) == ["x", "y"]
    cfg = load_config(path, ["slides=[{id: z, bundle: only}]"], schema=Schema)
    assert [s.id for s in cfg.slides] == ["z"]
    with pytest.raises(InputError, match=r"slides\.5\.bundle"):
        load_config(path, ["slides.5.bundle=x"], schema=Schema)  # no such list item: one clear error
    with pytest.raises(InputError, match="did you mean `slides.bundle`|bundle"):
        load_config(path, ["slides.0.bundel=x"], schema=Schema)


def test_load_config_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_config(tmp_path / "missing.yaml", schema=Schema)
    with pytest.raises(InputError, match="key=value"):
        load_config(None, ["train.epochs"], schema=Schema)
    bad = tmp_path / "bad.yaml"
    bad.write_text("crop: [unclosed\n")
    with pytest.raises(InputError, match="valid YAML"):
        load_config(bad, schema=Schema)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(InputError, match="mapping"):
        load_config(listing, schema=Schema)


def test_schema_keys_and_save_round_trip(tmp_path):
    keys = schema_keys(Schema)
    assert "crop.size_px" in keys and "checkpoint.every_steps" in keys and "model" in keys
    cfg = apply_schema(Schema, {"train": {"epochs": 2}})
    saved = save_config(cfg, tmp_path / "resolved.yaml")
    assert apply_schema(Schema, OmegaConf.load(saved)) == cfg


def test_schema_must_be_a_dataclass():
    with pytest.raises(TypeError):
        apply_schema(dict, {})

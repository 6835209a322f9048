"""The pretraining config schema: the shipped configs load as written, and a misspelled key (at any
depth) is refused by `launch/pretrain.py` and `launch/export.py` with the key and the closest valid one
named, exit code 2 and no traceback, before any process group starts or any file is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.config import apply_schema, load_config
from common.errors import InputError
from pretrain.config import PretrainConfig
from pretrain.trainer import Trainer
from tests.support import assert_refused, assert_subset, run_launch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))
TINY = ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"


# ---------------------------------------------------------------------------------------------
# The schema


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_unchanged_with_the_defaults_filled_in(path):
    cfg = load_config(path, [], schema=PretrainConfig)
    assert_subset(OmegaConf.to_container(OmegaConf.load(path), resolve=True), OmegaConf.to_container(cfg, resolve=True))
    assert cfg.train.betas == [0.9, 0.98] and cfg.debug.log_samples is False  # defaults filled in
    assert apply_schema(PretrainConfig, cfg) == cfg  # checking again changes nothing


def test_settings_that_take_several_types_and_open_sections_are_accepted():
    cfg = load_config(
        TINY,
        ["train.cpu_threads=3", "data.augment={brightness: 0.2}", "deepspeed.overrides.zero_optimization.stage=2"],
        schema=PretrainConfig,
    )
    assert cfg.train.cpu_threads == 3 and cfg.data.augment.brightness == 0.2
    assert cfg.deepspeed.overrides.zero_optimization.stage == 2


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("train.learning_rate=5e-4", "train.learning_rate", "train.lr"),
        ("chekpoint.every_steps=3", "chekpoint", "checkpoint"),
        ("loss.target_mix.ramp_epoch=2", "loss.target_mix.ramp_epoch", "loss.target_mix.ramp_epochs"),
    ],
)
def test_misspelled_keys_are_refused_with_the_closest_key(override, key, suggestion):
    with pytest.raises(InputError, match="did you mean") as error:
        load_config(TINY, [override], schema=PretrainConfig)
    assert key in str(error.value) and f"`{suggestion}`" in str(error.value)


def test_wrong_types_are_refused_naming_the_key():
    with pytest.raises(InputError, match="train.epochs") as error:
        load_config(TINY, ["train.epochs=ten"], schema=PretrainConfig)
    assert "int" in str(error.value)


def test_the_trainer_refuses_bad_settings_before_any_process_group(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match="did you mean `model.cell.layers`"):
        Trainer({"out_dir": str(out), "data": {"manifest": "m.json"}, "model": {"cell": {"layer": 2}}})
    with pytest.raises(InputError, match="data.manifest"):
        Trainer({"out_dir": str(out)})
    with pytest.raises(InputError, match="did you mean `train.lr`"):
        Trainer({"out_dir": str(out), "data": {"manifest": "m.json"}, "train": {"learning_rate": 1e-3}})
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The entry scripts


# A subprocess pays ~10 s importing torch/timm: in `make test`, not in `make test-fast`.
@pytest.mark.slow
@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("chekpoint.every_steps=3", "chekpoint", "checkpoint"),
        ("train.learning_rate=5e-4", "train.learning_rate", "train.lr"),
    ],
)
def test_launch_pretrain_refuses_a_misspelled_key_before_anything_starts(tmp_path, override, key, suggestion):
    out = tmp_path / "run"
    result = run_launch("pretrain.py", "--config", str(TINY), override, f"out_dir={out}")
    assert_refused(result, key, suggestion)
    assert not out.exists()


# A subprocess pays ~10 s importing torch/timm: in `make test`, not in `make test-fast`.
@pytest.mark.slow
def test_launch_export_refuses_a_misspelled_override_before_reading_or_writing(tmp_path):
    out = tmp_path / "export"
    result = run_launch(
        "export.py", "--checkpoint", str(tmp_path / "no_run"), "--out", str(out), "train.learnig_rate=1"
    )
    assert_refused(result, "train.learnig_rate", "train.lr")
    assert not out.exists() and not list(tmp_path.iterdir())

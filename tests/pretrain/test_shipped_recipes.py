"""The shipped pretraining configs use the objective that learns from random init, and the paper's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config
from pretrain.config import PretrainConfig
from pretrain.models import resolve_model_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_uses_the_objective_that_learns_and_guards_against_collapse(path):
    cfg = load_config(path, ["data.manifest=x.json"], schema=PretrainConfig)
    assert cfg.loss.detach_targets is False  # detached targets collapse (README, pretraining)
    assert (cfg.loss.target_mix.start, cfg.loss.target_mix.end) == (1.0, 1.0)  # the paper's objective
    assert cfg.loss.collapse_guard.enabled
    assert 0 < cfg.train.temperature.min < cfg.train.temperature.init < cfg.train.temperature.max


def test_paper_config_follows_the_paper_and_the_throughput_config_does_not_checkpoint():
    root = CONFIGS[0].parent
    paper = load_config(root / "past_vitl_8xa100.yaml", ["data.manifest=x.json"], schema=PretrainConfig)
    assert paper.train.micro_batch_size == 48 and paper.train.grad_accumulation == 1
    assert paper.train.epochs == 16 and paper.train.warmup_epochs == 1  # 1 warm-up + 15 cosine
    assert (paper.train.start_lr, paper.train.lr) == (1e-6, 1e-3)
    model = resolve_model_config(paper.model)
    assert model["graph"]["node_encoder"] == "tokens" and model["image"]["arch"] == "vit_large_patch16_224"
    uni = load_config(
        root / "past_vitl_8xa100.yaml", ["data.manifest=x.json", "model.image.preset=uni"], schema=PretrainConfig
    )
    assert resolve_model_config(uni.model)["image"]["kwargs"]["init_values"] == 1e-5
    fast = load_config(root / "vitl_throughput.yaml", ["data.manifest=x.json"], schema=PretrainConfig)
    assert resolve_model_config(fast.model)["grad_checkpointing"] is False

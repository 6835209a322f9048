"""The whole chain through the entry scripts, the way the README tells a user to run it.

A small procedural bundle goes through every stage's command line with the shipped configs and
``key=value`` overrides: make_bundle -> make_shards register / build / verify -> ``deepspeed``
pretraining (one CPU rank) -> export -> finetune embed (image crops, whole-slide tiles and the
cell encoder). Each stage reads only what the previous one wrote to disk, so this is the test that
the stages still fit together after a change to any of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata
import pytest

from tests.support import ROOT, run_launch

pytestmark = pytest.mark.slow

DATA = "configs/data/demo.yaml"
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def _ok(result: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{what} exited with {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}"
    return result


def test_bundle_to_shards_to_pretraining_to_export_to_embeddings(tmp_path):
    run = tmp_path / "run"
    data = [
        f"run_dir={run}",
        "bundle.mode=procedural",
        "bundle.n_cells=500",
        "bundle.slide_path=null",
        "bundle.deformation_um=0.0",
        "register.n_regions=1",
        "register.blend=false",
        "shards.samples_per_shard=200",
        "progress=false",
    ]
    _ok(run_launch("make_bundle.py", "--config", DATA, *data), "make_bundle")
    _ok(run_launch("make_shards.py", "register", "--config", DATA, *data), "make_shards register")
    _ok(run_launch("make_shards.py", "--config", DATA, *data), "make_shards build")
    verify = _ok(run_launch("make_shards.py", "verify", "--config", DATA, *data), "make_shards verify")
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["n_samples"] > 300 and manifest["n_shards"] >= 2
    assert f"{manifest['n_samples']:,} samples" in verify.stdout + verify.stderr

    pretrain = run / "pretrain"
    env = dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [
        str(DEEPSPEED),
        "--num_gpus",
        "1",
        "--master_port",
        "29561",
        "launch/pretrain.py",
        "--config",
        "configs/pretrain/tiny_cpu.yaml",
        f"data.manifest={run / 'shards'}",
        f"out_dir={pretrain}",
        "train.max_steps=4",
        "train.micro_batch_size=8",
        "checkpoint.every_steps=2",
        "log.every_steps=1",
    ]
    _ok(subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600), "deepspeed pretrain")
    metrics = json.loads((pretrain / "final_metrics.json").read_text())
    assert metrics["step"] == 4
    assert (pretrain / "checkpoints" / "latest").is_file()

    export = run / "export"
    _ok(run_launch("export.py", "--checkpoint", str(pretrain), "--out", str(export)), "export")
    for name in (
        "image_encoder/model.safetensors",
        "image_encoder/config.json",
        "cell_encoder/vocab.tsv",
        "README.md",
        "export.json",
    ):
        assert (export / name).is_file(), name

    embeddings = run / "embeddings"
    _ok(
        run_launch(
            "finetune.py",
            "embed",
            "--config",
            "configs/finetune/embed_demo.yaml",
            f"run_dir={run}",
            f"out_dir={embeddings}",
            f"cells.encoder={export}",
            "progress=false",
        ),
        "finetune embed",
    )
    index = json.loads((embeddings / "embeddings.json").read_text())
    crops = anndata.read_h5ad(embeddings / index["slides"]["demo"]["file"])
    assert crops.n_obs == manifest["n_samples"] and crops.n_vars == 96  # the tiny ViT's width
    tiles = anndata.read_h5ad(embeddings / index["slides"]["demo_wsi"]["file"])
    assert tiles.n_obs > 0 and tiles.n_vars == 96
    cells = anndata.read_h5ad(embeddings / "cells" / "demo.h5ad")
    assert cells.n_obs == manifest["n_samples"] and cells.n_vars == 64  # the joint space (proj_dim)

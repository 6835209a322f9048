"""Export of the trained encoders from real DeepSpeed checkpoints (no ZeRO, ZeRO-1, ZeRO-3; one CPU rank).

A tiny PAST model is wrapped in a DeepSpeed engine exactly as `pretrain.trainer` does
(PASTTrainingModule, `pretrain.checkpoint.save_checkpoint` with the run config beside it), takes
one optimizer step so the weights are no longer the initial ones, and is checkpointed. The
reference outputs are computed from the engine's own module after that step; the export must
reproduce them through plain timm (strict load), `load_image_encoder` and `load_cell_encoder`.
"""

from __future__ import annotations

import hashlib
import json
import runpy
import shutil
import socket
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import timm
import torch
import yaml
from safetensors.torch import load_file

from common.atomic import write_json
from common.config import apply_schema, save_config
from common.errors import InputError
from data_shards.tokenize import rank_tokens, save_tech_mean
from data_shards.vocabulary import PAD, Vocabulary
from pretrain import checkpoint as ckpt
from pretrain.config import PretrainConfig
from pretrain.export import export_checkpoint, load_cell_encoder, load_image_encoder
from tests.support import end_process_group

pytestmark = pytest.mark.slow  # DeepSpeed engines (about 5 s each after imports)

ROOT = Path(__file__).resolve().parents[2]
N_GENES = 40
CONTEXT = 16
IMAGE_PX = 32
ARCH = "vit_tiny_patch16_224"
IMAGE_KWARGS = {"img_size": IMAGE_PX, "patch_size": 16, "depth": 2, "embed_dim": 48, "num_heads": 3}
MODEL = {
    "image": {"arch": ARCH, "kwargs": IMAGE_KWARGS, "head": "mlp"},
    "cell": {"dim": 32, "heads": 4, "ff_dim": 64, "layers": 2, "context_length": None, "vocab_size": None},
    "graph": {"node_encoder": "transformer", "gat_layers": 1, "gat_heads": 2, "hidden": 16, "radius_um": 25.0},
    "fusion": {"heads": 4},
    "proj_dim": 8,
}
TOKENS = {"context_length": CONTEXT, "assay": "xenium", "modality": "spatial", "organism": "human"}
FINAL_METRICS = {
    "step": 1,
    "epoch": 0,
    "window_steps": 1,
    "loss": 2.0794,
    "temperature": 0.0712,
    "retrieval_top1_img_to_cell": 0.375,
    "retrieval_top1_cell_to_img": 0.25,
    "chance": 0.125,
    "global_micro_batch": 8,
    "samples_seen": 8,
}


# ---------------------------------------------------------------------------------------------
# Fixtures: shards' manifest + vocabulary, DeepSpeed checkpoints and reference outputs


def make_shard_folder(root: Path) -> Path:
    """manifest.json, vocab.tsv, tech_mean.npy as make_shards writes them (no shards needed)."""
    root.mkdir(parents=True)
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    vocab = Vocabulary.from_genes(ids, [f"GENE{i}" for i in range(N_GENES)], source="panel")
    vocab.save(root / "vocab.tsv")
    save_tech_mean(root / "tech_mean.npy", np.linspace(0.5, 4.0, N_GENES))
    write_json(
        root / "manifest.json",
        {
            "format_version": 1,
            "n_samples": 96,
            "n_shards": 1,
            "shards": [{"path": "s0/s0-000000.tar", "n_samples": 96, "slide": "s0"}],
            "vocabulary": {"path": "vocab.tsv", "sha256": vocab.sha256(), "size": len(vocab), "source": "panel"},
            "tech_mean": {"path": "tech_mean.npy", "source": "computed from the training cells"},
            "slides": {"s0": {"slide": "s0"}},
            "config": {
                "tokens": TOKENS,
                "crop": {"size_px": IMAGE_PX, "target_um_per_px": 0.5},
                "neighbours": {"k": 8, "radius_um": 50.0},
            },
        },
    )
    return root / "manifest.json"


def token_rows(n: int, lengths: list[int], generator: torch.Generator) -> torch.Tensor:
    """(n, CONTEXT): assay/modality/organism ids, distinct gene ids, then pad (1)."""
    tokens = torch.ones(n, CONTEXT, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, :3] = torch.tensor([9, 4, 5])
        tokens[row, 3:length] = torch.randperm(N_GENES, generator=generator)[: length - 3] + 30
    return tokens


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    """4 cells with 2, 0, 3 and 1 neighbours."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([2, 0, 3, 1])
    return {
        "image": torch.randn(4, 3, IMAGE_PX, IMAGE_PX, generator=g),
        "tokens": token_rows(4, [CONTEXT, 7, 11, 5], g),
        "nbr_tokens": token_rows(6, [4, 9, CONTEXT, 6, 12, 8], g),
        "nbr_offsets_um": torch.randn(6, 2, generator=g) * 12.0,
        "nbr_batch": torch.repeat_interleave(torch.arange(4), counts),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_one_step_and_checkpoint(run_dir: Path, manifest: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """One DeepSpeed step on one CPU rank, a checkpoint as pretrain.trainer saves it; reference outputs."""
    import deepspeed

    from pretrain.loss import LearnableTemperature, similarity_adjusted_loss
    from pretrain.models import build_model
    from pretrain.training_module import PASTTrainingModule, resolve_model_section

    cfg = apply_schema(PretrainConfig, {"out_dir": str(run_dir), "data": {"manifest": str(manifest)}, "model": MODEL})
    cfg.model = resolve_model_section(cfg, json.loads(manifest.read_text()))
    torch.manual_seed(zero_stage)
    module = PASTTrainingModule(build_model(cfg.model), LearnableTemperature(0.07, 0.01, 1.0))
    probe = make_batch(seed=2)
    with torch.no_grad():  # before training, so the tests can tell trained weights from initial ones
        initial_features = module.model.eval().image_encoder.features(probe["image"]).clone()
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    batch = make_batch(seed=1)
    out = engine(batch)
    engine.backward(similarity_adjusted_loss(out["img_emb"], out["cell_emb"], out["temperature"]))
    engine.step()

    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    client_state = {"step": 1, "epoch": 0, "micro_in_epoch": 1, "samples_seen": 4}
    ckpt.save_checkpoint(
        engine,
        run_dir / "checkpoints",
        1,
        client_state,
        write_extras=lambda tag_dir: save_config(cfg, tag_dir / "config.yaml"),
    )

    engine.eval()
    model = engine.module.model
    cells = {k: probe[k] for k in ("tokens", "nbr_tokens", "nbr_offsets_um", "nbr_batch")}
    with torch.no_grad():  # under ZeRO-3 the module's forward hooks gather the partitioned weights
        reference = {
            "image": probe["image"],
            "initial_features": initial_features,
            "cells": cells,
            "features": model.image_encoder.features(probe["image"]).clone(),
            "img_emb": model.encode_image(probe["image"]).clone(),
            "cell_emb": model.encode_cell(**cells).clone(),
            "cell_emb_alone": model.encode_cell(cells["tokens"]).clone(),
        }
    if hasattr(engine, "destroy"):  # ZeRO-3: remove its hooks from the module
        engine.destroy()
    return reference


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{zero stage: (run folder, reference outputs)} plus the shard manifest."""
    import torch.distributed as dist

    root = tmp_path_factory.mktemp("export")
    manifest = make_shard_folder(root / "shards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        for key, value in {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
        }.items():
            mp.setenv(key, value)
        import deepspeed

        started_here = not dist.is_initialized()
        if started_here:
            deepspeed.init_distributed(dist_backend="gloo")
        try:
            stages = {
                stage: (
                    root / f"run_zero{stage}",
                    train_one_step_and_checkpoint(root / f"run_zero{stage}", manifest, stage),
                )
                for stage in (0, 1, 3)
            }
        finally:
            if started_here:
                end_process_group()
    write_json(stages[1][0] / "final_metrics.json", FINAL_METRICS)
    return {"manifest": manifest, "stages": stages, "root": root}


@pytest.fixture(scope="module")
def exports(runs):
    """ZeRO-1 and no ZeRO exported from their run folders (``latest``), ZeRO-3 from its checkpoints/ folder."""
    root = runs["root"]
    stages = runs["stages"]
    export_checkpoint(stages[0][0], root / "export_zero0")
    export_checkpoint(stages[1][0], root / "export_zero1")
    export_checkpoint(stages[3][0] / "checkpoints", root / "export_zero3")
    return {stage: root / f"export_zero{stage}" for stage in stages}


STAGES = pytest.mark.parametrize("stage", [0, 1, 3])


# ---------------------------------------------------------------------------------------------
# The contract: plain timm, strict


@STAGES
def test_plain_timm_strict_load_reproduces_the_training_backbone_features(runs, exports, stage):
    image_dir = exports[stage] / "image_encoder"
    config = json.loads((image_dir / "config.json").read_text())
    assert config["architecture"] == ARCH and config["model_args"] == IMAGE_KWARGS
    model = timm.create_model(config["architecture"], **config["model_args"], num_classes=0)
    model.load_state_dict(load_file(str(image_dir / "model.safetensors")), strict=True)
    model.eval()
    reference = runs["stages"][stage][1]
    with torch.no_grad():
        features = model(reference["image"])
    assert features.shape == (4, IMAGE_KWARGS["embed_dim"])
    assert not torch.allclose(reference["features"], reference["initial_features"], atol=1e-3)  # it trained
    assert torch.allclose(features, reference["features"], atol=1e-5, rtol=0)


def test_timm_local_dir_loading_reads_the_config_and_weights(runs, exports):
    model = timm.create_model(f"local-dir:{exports[1] / 'image_encoder'}", pretrained=True).eval()
    assert model.num_classes == 0
    with torch.no_grad():
        features = model(runs["stages"][1][1]["image"])
    assert torch.allclose(features, runs["stages"][1][1]["features"], atol=1e-5, rtol=0)


@STAGES
def test_load_image_encoder_gives_backbone_features_and_the_training_embedding(runs, exports, stage):
    reference = runs["stages"][stage][1]
    encoder = load_image_encoder(exports[stage])
    with torch.no_grad():
        features, embedding = encoder(reference["image"]), encoder.embed(reference["image"])
    assert torch.allclose(features, reference["features"], atol=1e-5, rtol=0)
    assert embedding.shape == (4, MODEL["proj_dim"])
    assert torch.allclose(embedding, reference["img_emb"], atol=1e-5, rtol=0)
    assert encoder.data_config["input_size"] == [3, IMAGE_PX, IMAGE_PX]


@STAGES
def test_load_cell_encoder_reproduces_encode_cell_with_and_without_neighbours(runs, exports, stage):
    reference = runs["stages"][stage][1]
    encoder = load_cell_encoder(exports[stage] / "cell_encoder")
    with torch.no_grad():
        with_neighbours = encoder(**reference["cells"])
        alone = encoder(reference["cells"]["tokens"])
    assert with_neighbours.shape == (4, MODEL["proj_dim"])
    assert torch.allclose(with_neighbours, reference["cell_emb"], atol=1e-5, rtol=0)
    assert torch.allclose(alone, reference["cell_emb_alone"], atol=1e-5, rtol=0)
    # The niche matters: cell 0 has neighbours, so its embedding changes without them.
    assert not torch.allclose(with_neighbours[0], alone[0], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Vocabulary, tokenizer, card


def test_vocabulary_tech_mean_and_tokenizer_round_trip(runs, exports):
    shards = runs["manifest"].parent
    cell_dir = exports[1] / "cell_encoder"
    encoder = load_cell_encoder(exports[1])
    shard_vocab = Vocabulary.from_file(shards / "vocab.tsv")
    assert encoder.vocabulary.sha256() == shard_vocab.sha256()
    assert encoder.vocabulary.genes == shard_vocab.genes and encoder.vocabulary.symbols == shard_vocab.symbols
    assert (cell_dir / "vocab.tsv").read_bytes() == (shards / "vocab.tsv").read_bytes()
    np.testing.assert_array_equal(encoder.tech_mean, np.load(shards / "tech_mean.npy"))
    assert {k: encoder.tokenizer[k] for k in TOKENS} == TOKENS

    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(1.5, size=(5, 12)).astype(np.float32))
    adata = ad.AnnData(counts, var={"gene_ids": [f"ENSG{i:011d}" for i in range(3, 15)]})
    adata.var_names = [f"GENE{i}" for i in range(3, 15)]
    expected = rank_tokens(adata, shards / "vocab.tsv", shards / "tech_mean.npy", **TOKENS)
    np.testing.assert_array_equal(encoder.tokenize(adata), expected)
    # vocab.json: the same ids as the tokenizer writes into the tokens (genes and context tokens).
    table = json.loads((cell_dir / "vocab.json").read_text())["vocab"]
    assert [table[g] for g in shard_vocab.genes] == [shard_vocab.token_id(g) for g in shard_vocab.genes]
    assert table["[PAD]"] == PAD and table[f"assay:{TOKENS['assay']}"] == expected[0, 0]
    assert len(set(table.values())) == len(table)


def test_model_card_names_the_arch_the_manifest_hash_the_step_and_the_metrics(runs, exports):
    card = (exports[1] / "README.md").read_text()
    manifest_sha = hashlib.sha256(runs["manifest"].read_bytes()).hexdigest()
    assert manifest_sha in card
    assert ARCH in card and "step 1" in card
    for key in ("loss", "retrieval_top1_img_to_cell", "retrieval_top1_cell_to_img", "chance"):
        assert f"{FINAL_METRICS[key]:.4g}" in card
    assert "timm.create_model" in card and "load_cell_encoder" in card
    # Hugging Face front matter: a YAML block the Hub reads (library, licence, tags).
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "timm" and front["license"] == "other" and "histopathology" in front["tags"]
    # The zero-3 run has no final_metrics.json: the card says so instead of inventing figures.
    assert "No `final_metrics.json`" in (exports[3] / "README.md").read_text()


def test_export_json_lists_every_file_with_its_true_sha256(exports):
    summary = json.loads((exports[3] / "export.json").read_text())
    listed = summary["files"]
    on_disk = {str(p.relative_to(exports[3])) for p in exports[3].rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"export.json", "README.md"}
    for name, digest in listed.items():
        assert hashlib.sha256((exports[3] / name).read_bytes()).hexdigest() == digest
    assert summary["step"] == 1 and summary["source"]["tag"] == "step_000001"
    assert 0.01 <= summary["temperature"] <= 1.0


# ---------------------------------------------------------------------------------------------
# Entry script and bad inputs


def test_launch_script_exports_from_a_tag_folder(runs, tmp_path, monkeypatch):
    tag_dir = runs["stages"][3][0] / "checkpoints" / "step_000001"
    out = tmp_path / "cli_export"
    monkeypatch.setattr(sys, "argv", ["export.py", "--checkpoint", str(tag_dir), "--out", str(out), "--no-verify"])
    with pytest.raises(SystemExit) as exited:  # the script ends with sys.exit(<exit code>)
        runpy.run_path(str(ROOT / "launch" / "export.py"), run_name="__main__")
    assert exited.value.code == 0
    reference = runs["stages"][3][1]
    with torch.no_grad():
        embedding = load_image_encoder(out).embed(reference["image"])
    assert torch.allclose(embedding, reference["img_emb"], atol=1e-5, rtol=0)
    assert not list(tmp_path.glob(".*partial"))


def test_bad_checkpoint_paths_and_missing_config_raise_input_error_and_write_nothing(runs, tmp_path):
    run1 = runs["stages"][1][0]
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no such folder"):
        export_checkpoint(tmp_path / "nowhere", out)
    empty = tmp_path / "empty_checkpoints"
    empty.mkdir()
    with pytest.raises(InputError, match="latest"):
        export_checkpoint(empty, out)
    with pytest.raises(InputError, match="step_999999"):
        export_checkpoint(run1, out, tag="step_999999")
    # A tag folder copied away from its run: no config.yaml beside it.
    lonely = tmp_path / "lonely" / "step_000001"
    shutil.copytree(run1 / "checkpoints" / "step_000001", lonely)
    (lonely / "config.yaml").unlink()
    with pytest.raises(InputError, match="config"):
        export_checkpoint(lonely, out)
    with pytest.raises(InputError, match="manifest"):
        export_checkpoint(run1, out, manifest=tmp_path / "no_manifest.json")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_vocabulary_changed_since_training_is_refused(runs, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(runs["manifest"].parent, shards)
    lines = (shards / "vocab.tsv").read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # two genes swap token ids
    (shards / "vocab.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="sha256"):
        export_checkpoint(runs["stages"][1][0], tmp_path / "out", manifest=shards / "manifest.json")

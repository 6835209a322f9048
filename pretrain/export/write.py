"""Writing the export folder from a DeepSpeed checkpoint, and verifying it against the training model.

Export folder (written under a temporary name and renamed when complete)::

    <out>/
      README.md                 model card (pretrain.export.card): what, how to load, training summary, hashes, metrics
      export.json               the same facts, machine-readable (source, step, metrics, file sha256)
      training_config.yaml      the run's resolved config
      image_encoder/
        model.safetensors       the bare timm backbone's state_dict (num_classes=0)
        config.json             timm's hub format: architecture, model_args (the kwargs), pretrained_cfg
                                (input size, mean/std), plus a "past" section (projection, crop µm/pixel)
        projection.safetensors  the projection head to the joint space (state_dict of the head module)
      cell_encoder/
        model.safetensors       cell transformer + graph branch + fusion (or plain projection)
        config.json             the model config, tokenizer settings, vocabulary hash
        vocab.tsv               the shards' vocabulary (gene i has token id 30 + i)
        tech_mean.npy           per-gene technology mean used for ranking (when the shards had one)

Before writing, the run config (saved with the checkpoint, or ``--config``) and its ``key=value``
overrides are checked against :class:`pretrain.config.PretrainConfig`, and the shard manifest and
vocabulary against the hashes recorded at training. After writing, the encoders are reloaded from
the files (:mod:`pretrain.export.load`) and must reproduce the reconstructed fp32 model exactly.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

from common.atomic import atomic_dir
from common.config import load_config, save_config
from common.errors import InputError, read_json_file
from data_shards.manifest import MANIFEST_NAME, load_manifest
from data_shards.tokenize import load_tech_mean
from data_shards.vocabulary import GENE_OFFSET, PAD, Vocabulary

from .. import checkpoint as ckpt
from ..config import PretrainConfig
from ..loss import LearnableTemperature
from ..models import build_model, resolve_model_config
from ..models.image_encoder import IMAGENET_MEAN, IMAGENET_STD, load_state_strict
from ..training_module import resolve_model_section
from .card import render_model_card
from .consolidate import CheckpointLocation, consolidate_state_dict, find_checkpoint, split_training_state
from .load import (
    CELL_DIR,
    CELL_FORMAT,
    CONFIG_NAME,
    EXPORT_FORMAT_VERSION,
    IMAGE_DIR,
    IMAGE_FORMAT,
    PROJECTION_NAME,
    TECH_MEAN_NAME,
    VOCAB_JSON_NAME,
    VOCAB_NAME,
    WEIGHTS_NAME,
    load_cell_encoder,
    load_image_encoder,
)

log = logging.getLogger(__name__)

RUN_CONFIG_NAME = "config.yaml"  # written by pretrain.trainer in the run folder and in each tag folder
FINAL_METRICS_NAME = "final_metrics.json"
IMAGE_PREFIX = "image_encoder."  # PASTModel state-dict keys of the image tower (the rest is the cell tower)
MANIFEST_EXPECTED = "the shard manifest the run trained on (or pass --manifest)"
# timm pretrained_cfg fields that describe the exported weights' input (source tags/urls/licences do not apply).
_PRETRAINED_CFG_KEYS = (
    "input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "pool_size",
    "first_conv",
    "classifier",
)
_TOKENIZER_DEFAULTS = {"assay": "xenium", "modality": "spatial", "organism": "human"}
_VERIFY_ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Run config, manifest, vocabulary


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse a misspelled or mistyped ``key=value`` override before any checkpoint is read."""
    if overrides:
        resolve_model_config(load_config(None, overrides, schema=PretrainConfig).model)


def load_run_config(
    location: CheckpointLocation, config: str | Path | None = None, overrides: Sequence[str] = ()
) -> tuple[DictConfig, Path]:
    """The run config (``config`` if given, else the one saved with the checkpoint) checked against
    :class:`pretrain.config.PretrainConfig`, with ``key=value`` overrides; and the file it came from."""
    if config is None:
        candidates = [location.tag_dir / RUN_CONFIG_NAME, location.run_dir / RUN_CONFIG_NAME]
        config = next((path for path in candidates if path.is_file()), None)
        if config is None:
            raise InputError(
                candidates[0],
                None,
                f"the run config saved with the checkpoint (or in {candidates[1]}), or pass --config",
                "no such file",
            )
    cfg = load_config(config, overrides, schema=PretrainConfig)
    return cfg, Path(config)


def load_manifest_vocabulary(manifest: Mapping, manifest_path: Path) -> tuple[Vocabulary, Path]:
    """The vocabulary beside the shards, checked against the hash the manifest recorded."""
    info = manifest["vocabulary"]
    path = manifest_path.parent / info["path"]
    vocab = Vocabulary.from_file(path)
    if vocab.sha256() != info["sha256"]:
        raise InputError(
            path,
            "sha256",
            f"the vocabulary the shards were tokenized with ({info['sha256'][:12]}…, {manifest_path})",
            f"{vocab.sha256()[:12]}…",
        )
    return vocab, path


def tokenizer_settings(manifest: Mapping, context_length: int) -> dict:
    """How the shards were tokenized (data_shards.tokenize.rank_tokens arguments)."""
    tokens = dict(((manifest.get("config") or {}).get("tokens")) or {})
    settings = {key: tokens.get(key, default) for key, default in _TOKENIZER_DEFAULTS.items()}
    settings["context_length"] = int(tokens.get("context_length", context_length))
    if settings["context_length"] != context_length:
        log.warning(
            "shards were tokenized to %d tokens but the model's context is %d",
            settings["context_length"],
            context_length,
        )
    return settings


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing the encoders


def _save_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    # Clones: safetensors refuses tensors that share memory (tied or sliced weights).
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates private (0600) files; give them the mode their folder's files get.
    path.chmod(path.parent.stat().st_mode & 0o666)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _input_size(backbone: nn.Module, crop: Mapping[str, Any]) -> list[int]:
    """(C, H, W) the backbone was trained on: its fixed ViT size, else the shards' crop size."""
    size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    channels = int(backbone.pretrained_cfg.get("input_size", (3,))[0])
    if size is None and crop.get("size_px"):
        size = (int(crop["size_px"]),) * 2
    if size is None:
        return list(backbone.pretrained_cfg.get("input_size", (3, 224, 224)))
    return [channels, *(int(s) for s in size)]


def image_encoder_config(image_encoder: nn.Module, model_config: Mapping[str, Any], crop: Mapping[str, Any]) -> dict:
    """timm hub-format config.json (so ``local-dir:`` loading works) plus our ``past`` section.

    ``image_encoder``: the training-time image tower (:class:`pretrain.models.ImageTower`)."""
    backbone = image_encoder.backbone
    pretrained_cfg = {k: v for k, v in backbone.pretrained_cfg.items() if k in _PRETRAINED_CFG_KEYS}
    pretrained_cfg.update(
        input_size=_input_size(backbone, crop),
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        crop_pct=1.0,
        num_classes=0,
    )
    if tuple(pretrained_cfg["input_size"][1:]) != tuple(backbone.pretrained_cfg.get("input_size", (3, 0, 0))[1:]):
        pretrained_cfg["pool_size"] = None
    config = {
        "architecture": image_encoder.arch,
        "num_classes": 0,
        "num_features": int(backbone.num_features),
        "model_args": dict(image_encoder.arch_kwargs),
        "pretrained_cfg": pretrained_cfg,
        "past": {
            "format": IMAGE_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "weights": WEIGHTS_NAME,
            "projection": {
                "file": PROJECTION_NAME,
                "head": model_config["image"]["head"],
                "in_features": int(backbone.num_features),
                "out_features": int(model_config["proj_dim"]),
            },
            "embedding": "L2-normalised projection of the pooled backbone feature (PASTModel.encode_image)",
            "image_normalisation": "RGB / 255, then (x - mean) / std per channel (pretrained_cfg mean/std)",
            "crop": {"size_px": crop.get("size_px"), "target_um_per_px": crop.get("target_um_per_px")},
        },
    }
    json.dumps(config["model_args"])  # kwargs must be JSON for timm to rebuild the model
    return config


def write_image_encoder(
    image_encoder: nn.Module, folder: Path, model_config: Mapping[str, Any], crop: Mapping[str, Any]
) -> dict:
    """``image_encoder/`` (backbone and projection weights, config.json) of an image tower; its config."""
    _save_safetensors(image_encoder.backbone.state_dict(), folder / WEIGHTS_NAME)
    _save_safetensors(image_encoder.head.state_dict(), folder / PROJECTION_NAME)
    config = image_encoder_config(image_encoder, model_config, crop)
    _write_json(folder / CONFIG_NAME, config)
    return config


def cell_encoder_config(
    model_config: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    neighbours: Mapping[str, Any],
    temperature: float | None,
) -> dict:
    return {
        "format": CELL_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "weights": WEIGHTS_NAME,
        "model": copy.deepcopy(dict(model_config)),
        "embedding_dim": int(model_config["proj_dim"]),
        "embedding": "L2-normalised joint-space embedding (PASTModel.encode_cell)",
        "tokenizer": dict(tokenizer),
        "neighbours": dict(neighbours),
        "temperature": temperature,
    }


# ---------------------------------------------------------------------------------------------
# Verification


def _synthetic_cells(model_config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """3 cells with 2, 0 and 1 neighbours: rows of reserved ids, random genes and padding."""
    g = torch.Generator().manual_seed(seed)
    length, vocab_size = int(model_config["cell"]["context_length"]), int(model_config["cell"]["vocab_size"])

    def rows(n: int) -> torch.Tensor:
        tokens = torch.full((n, length), PAD, dtype=torch.long)
        for i in range(n):
            real = int(torch.randint(4, length + 1, (1,), generator=g))
            tokens[i, :3] = torch.tensor([9, 4, 5])[: min(3, real)]  # xenium, spatial, human
            tokens[i, 3:real] = torch.randint(GENE_OFFSET, vocab_size, (max(real - 3, 0),), generator=g)
        return tokens

    return {
        "tokens": rows(3),
        "nbr_tokens": rows(3),
        "nbr_offsets_um": torch.randn(3, 2, generator=g) * 15.0,
        "nbr_batch": torch.tensor([0, 0, 2]),
    }


@torch.no_grad()
def verify_export(model: nn.Module, export_dir: Path) -> dict[str, float]:
    """Reload the written encoders and compare them with the reconstructed training model."""
    model.eval()
    image = load_image_encoder(export_dir / IMAGE_DIR)
    size = image.data_config["input_size"]
    images = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    cell = load_cell_encoder(export_dir / CELL_DIR)
    cells = _synthetic_cells(model.config)
    differences = {
        "backbone_features": (image(images) - model.image_encoder.features(images)).abs().max().item(),
        "image_embedding": (image.embed(images) - model.encode_image(images)).abs().max().item(),
        "cell_embedding": (cell(**cells) - model.encode_cell(**cells)).abs().max().item(),
    }
    bad = {k: v for k, v in differences.items() if not v <= _VERIFY_ATOL}
    if bad:
        raise RuntimeError(f"exported encoders differ from the checkpoint's model by {bad} (> {_VERIFY_ATOL})")
    return differences


# ---------------------------------------------------------------------------------------------
# Export


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tag: str | None = None,
    config: str | Path | None = None,
    manifest: str | Path | None = None,
    overrides: Sequence[str] = (),
    verify: bool = True,
    license: str = "other",
) -> dict:
    """Write the export folder (see the module docstring) from a DeepSpeed checkpoint; its summary.

    ``checkpoint``: the run folder, its ``checkpoints/`` folder (``latest`` or ``tag``) or a tag
    folder. ``config``: a run config replacing the one saved with the checkpoint; ``manifest``:
    the shard manifest (default: the config's ``data.manifest``). ``license``: the Hugging Face
    licence identifier the model card declares (e.g. ``cc-by-nc-4.0``; ``other`` by default). All inputs are checked before
    anything is written; the folder appears complete or not at all.
    """
    check_overrides(overrides)
    location = find_checkpoint(checkpoint, tag)
    cfg, config_path = load_run_config(location, config, overrides)
    manifest_path = manifest or cfg.data.manifest
    if not manifest_path:
        raise InputError(None, "data.manifest", MANIFEST_EXPECTED, "none given")
    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        manifest_path = manifest_path / MANIFEST_NAME
    manifest_dict = load_manifest(manifest_path, require_shards=False, expected=MANIFEST_EXPECTED)
    vocab, vocab_path = load_manifest_vocabulary(manifest_dict, manifest_path)
    model_config = resolve_model_section(cfg, manifest_dict)
    if model_config["cell"]["vocab_size"] < GENE_OFFSET + len(vocab):
        raise InputError(
            config_path,
            "model.cell.vocab_size",
            f">= {GENE_OFFSET + len(vocab)} for the {len(vocab)} genes of {vocab_path}",
            model_config["cell"]["vocab_size"],
        )
    tech_mean_info = manifest_dict.get("tech_mean") or {}
    tech_mean_path = manifest_path.parent / tech_mean_info["path"] if tech_mean_info.get("path") else None
    if tech_mean_path is not None:
        load_tech_mean(tech_mean_path, vocab)  # exists and matches the vocabulary
    data_config = manifest_dict.get("config") or {}
    tokenizer = tokenizer_settings(manifest_dict, int(model_config["cell"]["context_length"]))
    tokenizer.update(
        vocabulary=VOCAB_NAME,
        vocabulary_sha256=vocab.sha256(),
        vocabulary_size=len(vocab),
        tech_mean=TECH_MEAN_NAME if tech_mean_path is not None else None,
        gene_token_offset=GENE_OFFSET,
        pad_id=PAD,
    )

    state, extras = split_training_state(consolidate_state_dict(location))
    model_config["image"]["weights"] = None  # the checkpoint holds the trained backbone
    model = build_model(model_config)
    load_state_strict(model, state, location.tag_dir, "the PAST model of the run config")
    model.eval()
    temperature = _temperature(extras, cfg)
    client_state = _read_optional_json(location.tag_dir / ckpt.CLIENT_STATE_NAME)
    final_metrics = _read_optional_json(location.run_dir / FINAL_METRICS_NAME)
    step = int(client_state.get("step", ckpt.step_of_tag(location.tag) or 0))

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        image_dir, cell_dir = tmp / IMAGE_DIR, tmp / CELL_DIR
        image_dir.mkdir()
        cell_dir.mkdir()
        image_config = write_image_encoder(model.image_encoder, image_dir, model_config, data_config.get("crop") or {})
        cell_state = {k: v for k, v in model.state_dict().items() if not k.startswith(IMAGE_PREFIX)}
        _save_safetensors(cell_state, cell_dir / WEIGHTS_NAME)
        shutil.copyfile(vocab_path, cell_dir / VOCAB_NAME)
        vocab.save_json(cell_dir / VOCAB_JSON_NAME)
        if tech_mean_path is not None:
            shutil.copyfile(tech_mean_path, cell_dir / TECH_MEAN_NAME)
        _write_json(
            cell_dir / CONFIG_NAME,
            cell_encoder_config(model_config, tokenizer, data_config.get("neighbours") or {}, temperature),
        )
        save_config(cfg, tmp / "training_config.yaml")
        differences = verify_export(model, tmp) if verify else None
        summary = {
            "format_version": EXPORT_FORMAT_VERSION,
            "license": license,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "source": {"checkpoint_dir": str(location.ckpt_dir), "tag": location.tag, "config": str(config_path)},
            "step": step,
            "epoch": client_state.get("epoch"),
            "samples_seen": client_state.get("samples_seen"),
            "temperature": temperature,
            "model": model_config,
            "image_encoder": {
                "architecture": image_config["architecture"],
                "model_args": image_config["model_args"],
                "num_features": image_config["num_features"],
                "proj_dim": model.proj_dim,
                "input_size": image_config["pretrained_cfg"]["input_size"],
                "crop": image_config["past"]["crop"],
            },
            "data": {
                "manifest": str(manifest_path),
                "manifest_sha256": file_sha256(manifest_path),
                "n_samples": manifest_dict.get("n_samples"),
                "n_shards": manifest_dict.get("n_shards"),
                "slides": sorted((manifest_dict.get("slides") or {}).keys()),
                "vocabulary_sha256": vocab.sha256(),
                "vocabulary_size": len(vocab),
            },
            "final_metrics": final_metrics or None,
            "verification_max_abs_difference": differences,
            "files": {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        _write_json(tmp / "export.json", summary)
        (tmp / "README.md").write_text(render_model_card(summary, tokenizer), encoding="utf-8")
    log.info("exported %s (step %d) to %s", location.tag_dir, step, out_dir)
    return summary


def _temperature(extras: Mapping[str, torch.Tensor], cfg: DictConfig) -> float | None:
    """τ at the checkpoint, as the loss computes it from ``temperature.raw`` and the run's bounds
    (or from ``temperature.logit_scale`` of checkpoints written before the bounded parametrisation)."""
    state = {k[len("temperature.") :]: v for k, v in extras.items() if k.startswith("temperature.")}
    if not state:
        return None
    bounds = cfg.train.temperature
    temperature = LearnableTemperature(float(bounds.init), float(bounds.min), float(bounds.max))
    temperature.load_state_dict(state)
    with torch.no_grad():
        return float(temperature())


def _read_optional_json(path: Path) -> dict:
    return read_json_file(path, "JSON") if path.is_file() else {}


def main(checkpoint: str | Path, out_dir: str | Path, **options: Any) -> int:
    """``launch/export.py``: export (``options`` as :func:`export_checkpoint` takes them), print the folder."""
    export_checkpoint(checkpoint, out_dir, **options)
    print(out_dir)
    return 0

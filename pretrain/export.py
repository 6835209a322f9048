"""Export the trained PAST encoders from a DeepSpeed checkpoint (any ZeRO stage) for downstream use.

Export folder (written under a temporary name and renamed when complete)::

    <out>/
      README.md                 model card: what, how to load, training summary, hashes, metrics
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

Plain timm reproduces the backbone features::

    cfg = json.load(open("image_encoder/config.json"))
    model = timm.create_model(cfg["architecture"], **cfg["model_args"], num_classes=0)
    model.load_state_dict(safetensors.torch.load_file("image_encoder/model.safetensors"), strict=True)

(or ``timm.create_model("local-dir:<out>/image_encoder", pretrained=True)``). ``load_image_encoder``
adds the projection head (``.embed`` = ``PASTModel.encode_image``) and ``load_cell_encoder`` the
whole cell tower with its vocabulary (``forward`` = ``PASTModel.encode_cell``).

Weights are DeepSpeed's fp32 master weights, consolidated with DeepSpeed's own ``zero_to_fp32``
utilities (ZeRO 1-3; without ZeRO the module state saved in the checkpoint). A run trained in bf16
computed its embeddings with bf16 copies of them, so exported fp32 embeddings agree with the
training model's to bf16 precision, and exactly with the reconstructed fp32 model (checked at export).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import glob
import hashlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from data_shards.atomic import atomic_dir
from data_shards.config import load_config, save_config
from data_shards.errors import InputError, read_json_file
from data_shards.manifest import FORMAT_VERSION as MANIFEST_FORMAT_VERSION
from data_shards.manifest import MANIFEST_NAME
from data_shards.vocabulary import GENE_OFFSET, Vocabulary

from . import checkpoint as ckpt

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
IMAGE_DIR, CELL_DIR = "image_encoder", "cell_encoder"
WEIGHTS_NAME = "model.safetensors"  # timm's preferred file name in a local-dir / hub folder
PROJECTION_NAME = "projection.safetensors"
CONFIG_NAME = "config.json"
VOCAB_NAME = "vocab.tsv"
TECH_MEAN_NAME = "tech_mean.npy"
RUN_CONFIG_NAME = "config.yaml"  # written by pretrain.train in the run folder and in each tag folder
FINAL_METRICS_NAME = "final_metrics.json"
TRAINING_MODULE_PREFIX = "model."  # pretrain.train.PASTTrainingModule: model.* and temperature.*
IMAGE_PREFIX, BACKBONE_PREFIX, HEAD_PREFIX = "image_encoder.", "image_encoder.backbone.", "image_encoder.head."
# timm pretrained_cfg fields that describe the exported weights' input (source tags/urls/licences do not apply).
_PRETRAINED_CFG_KEYS = (
    "input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
    "num_classes", "pool_size", "first_conv", "classifier",
)
_TOKENIZER_DEFAULTS = {"assay": "xenium", "modality": "spatial", "organism": "human"}
_VERIFY_ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Finding and consolidating the checkpoint


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
    ckpt_dir: Path  # the folder of tag folders (and ``latest``)
    tag: str

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def run_dir(self) -> Path:
        """The training run's out_dir (pretrain.train writes ``<out_dir>/checkpoints/<tag>``)."""
        return self.ckpt_dir.parent


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*model_states.pt"))


def find_checkpoint(path: str | Path, tag: str | None = None) -> CheckpointLocation:
    """A run folder, its ``checkpoints/`` folder (``latest`` or ``tag`` picks) or one tag folder."""
    path = Path(path)
    what = "a DeepSpeed checkpoint: the run folder, its checkpoints/ folder or one tag folder"
    if not path.is_dir():
        raise InputError(path, None, what, "no such folder")
    if _is_tag_dir(path):
        if tag is not None and tag != path.name:
            raise InputError(path, "tag", f"no --tag, or the folder's own tag '{path.name}'", tag)
        return CheckpointLocation(path.parent, path.name)
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if tag is None:
        tag = ckpt.read_latest(ckpt_dir)
        if tag is None:
            raise InputError(ckpt_dir / ckpt.LATEST, None, f"a '{ckpt.LATEST}' file naming the checkpoint tag "
                             "(or pass --tag)", "no such file")
    location = CheckpointLocation(ckpt_dir, tag)
    if not _is_tag_dir(location.tag_dir):
        raise InputError(location.tag_dir, None, "a DeepSpeed tag folder holding *model_states.pt files",
                         "missing" if not location.tag_dir.exists() else "no model states in it")
    return location


def consolidate_state_dict(location: CheckpointLocation) -> dict[str, torch.Tensor]:
    """The full fp32 state_dict of the DeepSpeed module, gathered from every rank's shards."""
    tag_dir = location.tag_dir
    if not glob.glob(str(tag_dir / "*optim_states.pt")):
        return _module_state_without_zero(tag_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # zero_to_fp32 prints its progress; keep it for the debug log
    try:
        with contextlib.redirect_stdout(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(str(location.ckpt_dir), tag=location.tag)
    except ValueError as exc:
        if "is not a zero checkpoint" in str(exc):
            return _module_state_without_zero(tag_dir)
        raise InputError(tag_dir, None, "a complete DeepSpeed ZeRO checkpoint", str(exc)) from exc
    except FileNotFoundError as exc:
        raise InputError(tag_dir, None, "a complete DeepSpeed ZeRO checkpoint", str(exc)) from exc
    finally:
        log.debug("zero_to_fp32: %s", chatter.getvalue().strip())
    log.info("consolidated %d tensors from %s with DeepSpeed's zero_to_fp32", len(state), tag_dir)
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def _module_state_without_zero(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Without ZeRO, rank 0's model states file holds the whole module state."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise InputError(tag_dir, None, "mp_rank_00_model_states.pt (a checkpoint saved without ZeRO)", "missing")
    saved = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed pickles more than tensors
    module = saved.get("module") if isinstance(saved, Mapping) else None
    if not isinstance(module, Mapping) or not module:
        raise InputError(path, "module", "the module's state_dict", "missing or empty")
    log.info("read %d tensors from %s (checkpoint saved without ZeRO)", len(module), path)
    return {key: value.float() if value.is_floating_point() else value for key, value in module.items()}


def split_training_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PASTTrainingModule state → (PASTModel state, the rest, e.g. ``temperature.logit_scale``).

    A bare PASTModel's state (no ``model.`` prefix) passes through unchanged.
    """
    if not any(key.startswith(TRAINING_MODULE_PREFIX) for key in state):
        return dict(state), {}
    model_state = {k[len(TRAINING_MODULE_PREFIX):]: v for k, v in state.items() if k.startswith(TRAINING_MODULE_PREFIX)}
    extras = {k: v for k, v in state.items() if not k.startswith(TRAINING_MODULE_PREFIX)}
    return model_state, extras


# ---------------------------------------------------------------------------------------------
# Run config, manifest, vocabulary


def load_run_config(location: CheckpointLocation, config: str | Path | None = None,
                    overrides: Sequence[str] = ()) -> tuple[DictConfig, Path]:
    """The run config (``config`` if given, else the one saved with the checkpoint) over the
    training defaults, with ``key=value`` overrides; and the file it came from."""
    from .train import DEFAULTS

    if config is None:
        candidates = [location.tag_dir / RUN_CONFIG_NAME, location.run_dir / RUN_CONFIG_NAME]
        config = next((path for path in candidates if path.is_file()), None)
        if config is None:
            raise InputError(candidates[0], None, f"the run config saved with the checkpoint (or in "
                             f"{candidates[1]}), or pass --config", "no such file")
    cfg = load_config(config, overrides, defaults=DEFAULTS)
    return cfg, Path(config)


def read_manifest(path: str | Path | None) -> tuple[dict, Path]:
    """The shard manifest (file or folder) and its path. The shards themselves need not be present."""
    if not path:
        raise InputError(None, "data.manifest", "the shard manifest the run trained on (or pass --manifest)", "none given")
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    manifest = read_json_file(path, "the shard manifest the run trained on (or pass --manifest)")
    if manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise InputError(path, "format_version", str(MANIFEST_FORMAT_VERSION), manifest.get("format_version"))
    vocab = manifest.get("vocabulary") or {}
    missing = [key for key in ("path", "sha256", "size") if key not in vocab]
    if missing:
        raise InputError(path, "vocabulary", "path, sha256 and size of the shards' vocabulary", f"missing {missing}")
    return manifest, path


def load_manifest_vocabulary(manifest: Mapping, manifest_path: Path) -> tuple[Vocabulary, Path]:
    """The vocabulary beside the shards, checked against the hash the manifest recorded."""
    info = manifest["vocabulary"]
    path = manifest_path.parent / info["path"]
    vocab = Vocabulary.from_file(path)
    if vocab.sha256() != info["sha256"]:
        raise InputError(path, "sha256", f"the vocabulary the shards were tokenized with ({info['sha256'][:12]}…, "
                         f"{manifest_path})", f"{vocab.sha256()[:12]}…")
    return vocab, path


def tokenizer_settings(manifest: Mapping, context_length: int) -> dict:
    """How the shards were tokenized (data_shards.tokenize.rank_tokens arguments)."""
    tokens = dict(((manifest.get("config") or {}).get("tokens")) or {})
    settings = {key: tokens.get(key, default) for key, default in _TOKENIZER_DEFAULTS.items()}
    settings["context_length"] = int(tokens.get("context_length", context_length))
    if settings["context_length"] != context_length:
        log.warning("shards were tokenized to %d tokens but the model's context is %d",
                    settings["context_length"], context_length)
    return settings


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Exported modules


class PretrainedImageEncoder(nn.Module):
    """Exported image tower: timm backbone (B, 3, H, W) → (B, num_features); ``embed`` → (B, proj_dim).

    ``forward``/``features`` give the pooled backbone feature (fine-tuning heads go on it);
    ``embed`` the L2-normalised joint-space embedding, identical to ``PASTModel.encode_image``.
    ``data_config`` holds the input size, interpolation and the mean/std images are normalised with.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, config: Mapping[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = copy.deepcopy(dict(config))
        self.arch = config["architecture"]
        self.arch_kwargs = dict(config["model_args"])
        self.num_features = int(backbone.num_features)
        self.proj_dim = int(config["past"]["projection"]["out_features"])
        self.data_config = dict(config["pretrained_cfg"])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised → pooled backbone features (B, num_features)."""
        dtype = next(self.backbone.parameters()).dtype
        return self.backbone(images.to(dtype))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised → L2-normalised embeddings (B, proj_dim)."""
        return F.normalize(self.head(self.features(images)), dim=-1)

    def forward(self, images: torch.Tensor, project: bool = False) -> torch.Tensor:
        return self.embed(images) if project else self.features(images)


class PretrainedCellEncoder(nn.Module):
    """Exported cell tower (transformer + graph branch + fusion) with its tokenizer.

    ``forward(tokens, nbr_tokens, nbr_offsets_um, nbr_batch)`` → L2-normalised (B, proj_dim),
    identical to ``PASTModel.encode_cell`` (shapes: tokens (B, L), nbr_tokens (N, L),
    nbr_offsets_um (N, 2) µm neighbour minus centre, nbr_batch (N,) centre row of each neighbour).
    ``tokenize(adata)`` turns cells into rank tokens exactly as the training shards were made.
    """

    def __init__(self, tower: nn.Module, vocabulary: Vocabulary, tech_mean: np.ndarray | None,
                 tokenizer: Mapping[str, Any], config: Mapping[str, Any]):
        super().__init__()
        self.tower = tower  # a PASTModel without its image encoder
        self.vocabulary = vocabulary
        self.tech_mean = tech_mean
        self.tokenizer = dict(tokenizer)
        self.config = copy.deepcopy(dict(config))
        self.proj_dim = int(tower.proj_dim)

    def features(self, tokens, nbr_tokens=None, nbr_offsets_um=None, nbr_batch=None) -> dict[str, torch.Tensor]:
        """cell_feat (B, D), graph_feat (B, D) when the graph branch is on, cell_out (B, proj_dim)."""
        return self.tower.cell_features(tokens, nbr_tokens, nbr_offsets_um, nbr_batch)

    def forward(self, tokens, nbr_tokens=None, nbr_offsets_um=None, nbr_batch=None) -> torch.Tensor:
        return self.tower.encode_cell(tokens, nbr_tokens, nbr_offsets_um, nbr_batch)

    def tokenize(self, adata) -> np.ndarray:
        """AnnData of raw counts → int32 rank tokens (n_cells, context_length)."""
        from data_shards.tokenize import rank_tokens

        t = self.tokenizer
        return rank_tokens(adata, self.vocabulary, self.tech_mean, t["context_length"], t["assay"], t["modality"], t["organism"])


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(path, None, "an exported safetensors file", "no such file")
    return load_file(str(path), device="cpu")


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path | str, what: str) -> None:
    """load_state_dict(strict=True), as one InputError naming the file on any mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                         for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        found = "; ".join(f"{label} ({len(keys)}): {keys[:6]}{' ...' if len(keys) > 6 else ''}"
                          for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong_shape)) if keys)
        raise InputError(source, "state_dict", f"the parameters of {what}", found)
    module.load_state_dict(state, strict=True)


def load_image_encoder(path: str | Path, device: str | torch.device = "cpu") -> PretrainedImageEncoder:
    """An exported ``image_encoder/`` folder (or the export folder holding it) → eval-mode encoder."""
    from .models.image_encoder import create_backbone, make_projection_head

    path = Path(path)
    if (path / IMAGE_DIR).is_dir():
        path = path / IMAGE_DIR
    config = read_json_file(path / CONFIG_NAME, "the config.json of an exported image encoder")
    past = config.get("past") or {}
    if past.get("format") != "past-image-encoder":
        raise InputError(path / CONFIG_NAME, "past.format", "'past-image-encoder' (written by pretrain.export)", past.get("format"))
    backbone = create_backbone(config["architecture"], config["model_args"])
    _load_strict(backbone, _load_safetensors(path / WEIGHTS_NAME), path / WEIGHTS_NAME, f"timm '{config['architecture']}'")
    projection = past["projection"]
    head = make_projection_head(int(projection["in_features"]), int(projection["out_features"]), projection["head"])
    _load_strict(head, _load_safetensors(path / projection["file"]), path / projection["file"], "the projection head")
    return PretrainedImageEncoder(backbone, head, config).to(device).eval()


def build_cell_tower(model_config: Mapping[str, Any]) -> nn.Module:
    """A PASTModel without its image encoder, parameters allocated but not initialised (load next)."""
    from .models import build_model

    mc = copy.deepcopy(dict(model_config))
    mc["image"] = {**mc["image"], "weights": None}
    with torch.device("meta"):  # never allocate (or initialise) an image tower we would drop
        tower = build_model(mc)
    tower.image_encoder = None
    return tower.to_empty(device="cpu")


def load_cell_encoder(path: str | Path, device: str | torch.device = "cpu") -> PretrainedCellEncoder:
    """An exported ``cell_encoder/`` folder (or the export folder holding it) → eval-mode encoder."""
    from data_shards.tokenize import load_tech_mean

    path = Path(path)
    if (path / CELL_DIR).is_dir():
        path = path / CELL_DIR
    config = read_json_file(path / CONFIG_NAME, "the config.json of an exported cell encoder")
    if config.get("format") != "past-cell-encoder":
        raise InputError(path / CONFIG_NAME, "format", "'past-cell-encoder' (written by pretrain.export)", config.get("format"))
    tokenizer = config["tokenizer"]
    vocab = Vocabulary.from_file(path / tokenizer["vocabulary"])
    if vocab.sha256() != tokenizer["vocabulary_sha256"]:
        raise InputError(path / tokenizer["vocabulary"], "sha256", tokenizer["vocabulary_sha256"], vocab.sha256())
    tech_mean = load_tech_mean(path / tokenizer["tech_mean"], vocab) if tokenizer.get("tech_mean") else None
    tower = build_cell_tower(config["model"])
    state = _load_safetensors(path / WEIGHTS_NAME)
    _load_strict(tower, state, path / WEIGHTS_NAME, "the PAST cell tower of config.json")
    # to_empty left any non-persistent buffer uninitialised; there must be none.
    stray = sorted(name for name, _ in tower.named_buffers() if name not in state)
    if stray:
        raise RuntimeError(f"cell tower has buffers outside its state_dict, not restorable from {path}: {stray}")
    return PretrainedCellEncoder(tower, vocab, tech_mean, tokenizer, config).to(device).eval()


# ---------------------------------------------------------------------------------------------
# Export


def _save_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

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
    """timm hub-format config.json (so ``local-dir:`` loading works) plus our ``past`` section."""
    from .collate import IMAGENET_MEAN, IMAGENET_STD

    backbone = image_encoder.backbone
    pretrained_cfg = {k: v for k, v in backbone.pretrained_cfg.items() if k in _PRETRAINED_CFG_KEYS}
    pretrained_cfg.update(
        input_size=_input_size(backbone, crop), mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
        crop_pct=1.0, num_classes=0,
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
            "format": "past-image-encoder",
            "format_version": EXPORT_FORMAT_VERSION,
            "weights": WEIGHTS_NAME,
            "projection": {
                "file": PROJECTION_NAME, "head": model_config["image"]["head"],
                "in_features": int(backbone.num_features), "out_features": int(model_config["proj_dim"]),
            },
            "embedding": "L2-normalised projection of the pooled backbone feature (PASTModel.encode_image)",
            "image_normalisation": "RGB / 255, then (x - mean) / std per channel (pretrained_cfg mean/std)",
            "crop": {"size_px": crop.get("size_px"), "target_um_per_px": crop.get("target_um_per_px")},
        },
    }
    json.dumps(config["model_args"])  # kwargs must be JSON for timm to rebuild the model
    return config


def cell_encoder_config(model_config: Mapping[str, Any], tokenizer: Mapping[str, Any],
                        neighbours: Mapping[str, Any], temperature: float | None) -> dict:
    return {
        "format": "past-cell-encoder",
        "format_version": EXPORT_FORMAT_VERSION,
        "weights": WEIGHTS_NAME,
        "model": copy.deepcopy(dict(model_config)),
        "embedding_dim": int(model_config["proj_dim"]),
        "embedding": "L2-normalised joint-space embedding (PASTModel.encode_cell)",
        "tokenizer": dict(tokenizer),
        "neighbours": dict(neighbours),
        "temperature": temperature,
    }


def _synthetic_cells(model_config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """3 cells with 2, 0 and 1 neighbours: rows of reserved ids, random genes and padding."""
    g = torch.Generator().manual_seed(seed)
    length, vocab_size = int(model_config["cell"]["context_length"]), int(model_config["cell"]["vocab_size"])

    def rows(n: int) -> torch.Tensor:
        tokens = torch.ones(n, length, dtype=torch.long)
        for i in range(n):
            real = int(torch.randint(4, length + 1, (1,), generator=g))
            tokens[i, :3] = torch.tensor([9, 4, 5])[: min(3, real)]
            tokens[i, 3:real] = torch.randint(GENE_OFFSET, vocab_size, (max(real - 3, 0),), generator=g)
        return tokens

    return {
        "tokens": rows(3), "nbr_tokens": rows(3),
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


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tag: str | None = None,
    config: str | Path | None = None,
    manifest: str | Path | None = None,
    overrides: Sequence[str] = (),
    verify: bool = True,
) -> dict:
    """Write the export folder (see the module docstring) from a DeepSpeed checkpoint; its summary.

    ``checkpoint``: the run folder, its ``checkpoints/`` folder (``latest`` or ``tag``) or a tag
    folder. ``config``: a run config replacing the one saved with the checkpoint; ``manifest``:
    the shard manifest (default: the config's ``data.manifest``). All inputs are checked before
    anything is written; the folder appears complete or not at all.
    """
    from .models import build_model
    from .train import resolve_model_section

    location = find_checkpoint(checkpoint, tag)
    cfg, config_path = load_run_config(location, config, overrides)
    manifest_dict, manifest_path = read_manifest(manifest or cfg.data.manifest)
    vocab, vocab_path = load_manifest_vocabulary(manifest_dict, manifest_path)
    model_config = resolve_model_section(cfg, manifest_dict)
    if model_config["cell"]["vocab_size"] < GENE_OFFSET + len(vocab):
        raise InputError(config_path, "model.cell.vocab_size", f">= {GENE_OFFSET + len(vocab)} for the "
                         f"{len(vocab)} genes of {vocab_path}", model_config["cell"]["vocab_size"])
    tech_mean_info = manifest_dict.get("tech_mean") or {}
    tech_mean_path = manifest_path.parent / tech_mean_info["path"] if tech_mean_info.get("path") else None
    if tech_mean_path is not None:
        from data_shards.tokenize import load_tech_mean

        load_tech_mean(tech_mean_path, vocab)  # exists and matches the vocabulary
    data_config = manifest_dict.get("config") or {}
    tokenizer = tokenizer_settings(manifest_dict, int(model_config["cell"]["context_length"]))
    tokenizer.update(
        vocabulary=VOCAB_NAME, vocabulary_sha256=vocab.sha256(), vocabulary_size=len(vocab),
        tech_mean=TECH_MEAN_NAME if tech_mean_path is not None else None, gene_token_offset=GENE_OFFSET, pad_id=1,
    )

    state, extras = split_training_state(consolidate_state_dict(location))
    model_config["image"]["weights"] = None  # the checkpoint holds the trained backbone
    model = build_model(model_config)
    _load_strict(model, state, location.tag_dir, "the PAST model of the run config")
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
        _save_safetensors(model.image_encoder.backbone.state_dict(), image_dir / WEIGHTS_NAME)
        _save_safetensors(model.image_encoder.head.state_dict(), image_dir / PROJECTION_NAME)
        image_config = image_encoder_config(model.image_encoder, model_config, data_config.get("crop") or {})
        _write_json(image_dir / CONFIG_NAME, image_config)
        cell_state = {k: v for k, v in model.state_dict().items() if not k.startswith(IMAGE_PREFIX)}
        _save_safetensors(cell_state, cell_dir / WEIGHTS_NAME)
        shutil.copyfile(vocab_path, cell_dir / VOCAB_NAME)
        if tech_mean_path is not None:
            shutil.copyfile(tech_mean_path, cell_dir / TECH_MEAN_NAME)
        _write_json(cell_dir / CONFIG_NAME, cell_encoder_config(
            model_config, tokenizer, data_config.get("neighbours") or {}, temperature))
        save_config(cfg, tmp / "training_config.yaml")
        differences = verify_export(model, tmp) if verify else None
        summary = {
            "format_version": EXPORT_FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"checkpoint_dir": str(location.ckpt_dir), "tag": location.tag, "config": str(config_path)},
            "step": step,
            "epoch": client_state.get("epoch"),
            "samples_seen": client_state.get("samples_seen"),
            "temperature": temperature,
            "model": model_config,
            "image_encoder": {
                "architecture": image_config["architecture"], "model_args": image_config["model_args"],
                "num_features": image_config["num_features"], "proj_dim": model.proj_dim,
                "input_size": image_config["pretrained_cfg"]["input_size"], "crop": image_config["past"]["crop"],
            },
            "data": {
                "manifest": str(manifest_path), "manifest_sha256": file_sha256(manifest_path),
                "n_samples": manifest_dict.get("n_samples"), "n_shards": manifest_dict.get("n_shards"),
                "slides": sorted((manifest_dict.get("slides") or {}).keys()),
                "vocabulary_sha256": vocab.sha256(), "vocabulary_size": len(vocab),
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
    """τ at the checkpoint, clamped to the run's range like the loss does."""
    from .loss import LearnableTemperature

    logit_scale = extras.get("temperature.logit_scale")
    if logit_scale is None:
        return None
    bounds = cfg.train.temperature
    temperature = LearnableTemperature(float(bounds.init), float(bounds.min), float(bounds.max))
    temperature.load_state_dict({"logit_scale": logit_scale.reshape(())})
    with torch.no_grad():
        return float(temperature())


def _read_optional_json(path: Path) -> dict:
    return read_json_file(path, "JSON") if path.is_file() else {}


# ---------------------------------------------------------------------------------------------
# Model card


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "—" if value is None else str(value)


def render_model_card(summary: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> str:
    """README.md of the export: what the encoders are, how to load them, how they were trained."""
    mc = summary["model"]
    image = summary["image_encoder"]
    cell, graph = mc["cell"], mc["graph"]
    data = summary["data"]
    metrics = summary.get("final_metrics") or {}
    lines = [
        "# PAST encoders (H&E image + Xenium cell)",
        "",
        "Two encoders pretrained jointly with PAST's similarity-adjusted contrastive objective on pairs of",
        "an H&E crop centred on a cell and that cell's Xenium expression (rank tokens) with its spatial",
        f"neighbours. Both map into one {mc['proj_dim']}-d joint space (L2-normalised).",
        "",
        "| encoder | architecture | output |",
        "| --- | --- | --- |",
        f"| image | timm `{image['architecture']}` {json.dumps(image['model_args'])}, projection head "
        f"`{mc['image']['head']}` | backbone feature {image['num_features']}-d; embedding {mc['proj_dim']}-d |",
        f"| cell | transformer ({cell['layers']} layers, dim {cell['dim']}, {cell['heads']} heads, context "
        f"{cell['context_length']} tokens, vocabulary {cell['vocab_size']} ids)"
        + (f" + GAT niche branch ({graph['gat_layers']} layer(s), {graph['node_encoder']} nodes, radius "
           f"{graph['radius_um']} µm) + attention fusion" if graph["enabled"] else " + linear projection")
        + f" | embedding {mc['proj_dim']}-d |",
        "",
        "## Load",
        "",
        "Plain timm (backbone features, for fine-tuning heads):",
        "",
        "```python",
        "import json, timm, safetensors.torch",
        "cfg = json.load(open('image_encoder/config.json'))",
        "model = timm.create_model(cfg['architecture'], **cfg['model_args'], num_classes=0)",
        "model.load_state_dict(safetensors.torch.load_file('image_encoder/model.safetensors'), strict=True)",
        "# or: timm.create_model('local-dir:<this folder>/image_encoder', pretrained=True)",
        "```",
        "",
        "With this project (joint-space embeddings):",
        "",
        "```python",
        "from pretrain.export import load_image_encoder, load_cell_encoder",
        "image = load_image_encoder('.')   # image(x) -> backbone features; image.embed(x) -> joint embedding",
        "cell = load_cell_encoder('.')     # cell(tokens, nbr_tokens, nbr_offsets_um, nbr_batch) -> joint embedding",
        "tokens = cell.tokenize(adata)     # raw counts -> rank tokens, as in training",
        "```",
        "",
        f"Images: RGB crops of {image['input_size'][1]}×{image['input_size'][2]} px"
        + (f" at {image['crop']['target_um_per_px']} µm/pixel" if image["crop"].get("target_um_per_px")
           else " at the slide's level-0 resolution")
        + ", divided by 255 and normalised with the ImageNet mean/std in `image_encoder/config.json`.",
        f"Cells: `data_shards.tokenize.rank_tokens(adata, vocab, tech_mean, context_length={tokenizer['context_length']}, "
        f"assay='{tokenizer['assay']}', modality='{tokenizer['modality']}', organism='{tokenizer['organism']}')` with "
        f"`cell_encoder/{VOCAB_NAME}`" + (f" and `cell_encoder/{TECH_MEAN_NAME}`" if tokenizer.get("tech_mean") else "")
        + "; neighbour offsets in µm (neighbour minus centre).",
        "",
        "## Training",
        "",
        f"- checkpoint: `{summary['source']['checkpoint_dir']}` tag `{summary['source']['tag']}`; "
        f"step {summary['step']}, epoch {_fmt(summary.get('epoch'))}, samples seen {_fmt(summary.get('samples_seen'))}",
        f"- data manifest: `{data['manifest']}`, sha256 `{data['manifest_sha256']}`; {_fmt(data['n_samples'])} cells "
        f"in {_fmt(data['n_shards'])} shard(s) from {len(data['slides'])} slide(s)",
        f"- vocabulary: {data['vocabulary_size']} genes, sha256 `{data['vocabulary_sha256']}`",
        f"- temperature τ at this checkpoint: {_fmt(summary.get('temperature'))}",
        "- full config: `training_config.yaml`",
        "",
        "## Final metrics",
        "",
    ]
    if metrics:
        if metrics.get("step") is not None and metrics["step"] != summary["step"]:
            lines += [f"(measured at the end of the run, step {metrics['step']}, not at this checkpoint's step "
                      f"{summary['step']})", ""]
        lines += [
            f"Means over the last {_fmt(metrics.get('window_steps'))} training steps "
            f"(global micro batch {_fmt(metrics.get('global_micro_batch'))}):",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| loss | {_fmt(metrics.get('loss'))} |",
            f"| retrieval top-1, image → cell | {_fmt(metrics.get('retrieval_top1_img_to_cell'))} |",
            f"| retrieval top-1, cell → image | {_fmt(metrics.get('retrieval_top1_cell_to_img'))} |",
            f"| chance | {_fmt(metrics.get('chance'))} |",
            f"| temperature τ | {_fmt(metrics.get('temperature'))} |",
            "",
        ]
    else:
        lines += ["No `final_metrics.json` beside the checkpoint (the run did not finish, or ran elsewhere).", ""]
    differences = summary.get("verification_max_abs_difference")
    if differences:
        lines += ["## Verification", "",
                  "Reloaded from these files, the encoders reproduce the checkpoint's model (max |difference|: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in differences.items()) + ").", ""]
    lines += [
        "## Files",
        "",
        "| file | sha256 |",
        "| --- | --- |",
        *(f"| `{name}` | `{digest}` |" for name, digest in summary["files"].items()),
        "",
        "## Intended use and limitations",
        "",
        "- Feature extraction and fine-tuning for research on H&E and spatial transcriptomics (gene expression",
        "  prediction, virtual staining, survival, multiplex IF); not validated for clinical use.",
        "- The cell encoder only knows the genes of its vocabulary; genes outside it are dropped when tokenizing,",
        "  and expression is ranked against the training technology mean, so other assays or panels shift it.",
        "- The image encoder saw crops at one resolution and one staining distribution (the training slides);",
        "  other scanners, stains or magnifications need checking before use.",
        "- Weights are fp32 master weights; a bf16-trained run's embeddings match them to bf16 precision.",
        "",
    ]
    return "\n".join(lines)


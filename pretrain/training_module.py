"""What DeepSpeed trains: the PAST model and the loss's temperature as one module, its AdamW groups,
and the model section completed from the shard manifest.

State dict of :class:`PASTTrainingModule` (what a checkpoint holds, what export splits):
``model.*`` (a :class:`pretrain.models.PASTModel`) and ``temperature.raw`` (shape (1,); τ is a bounded
function of it, see :class:`pretrain.loss.LearnableTemperature`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.errors import InputError
from data_shards.vocabulary import GENE_OFFSET

from .loss import LearnableTemperature
from .models import resolve_model_config

MODEL_PREFIX = "model."  # state-dict keys of the PASTModel inside the training module
# Parameters without weight decay besides biases and norm gains (any 0/1-d parameter).
_NO_DECAY_NAMES = ("pos_embed", "position_embedding", "cls_token", "reg_token", "temperature.raw")


class PASTTrainingModule(nn.Module):
    """The PAST model and the loss's learnable temperature as one module, so DeepSpeed sees both.

    State dict keys: ``model.*`` (a :class:`pretrain.models.PASTModel`) and
    ``temperature.raw`` (shape (1,): DeepSpeed's initial broadcast cannot view a 0-dim parameter as bytes).
    """

    def __init__(self, model: nn.Module, temperature: LearnableTemperature):
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(self.model(batch))
        out["temperature"] = self.temperature().reshape(())  # 0-dim, differentiable
        return out


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on biases, norms, embeddings of position, τ."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(part in name for part in _NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def resolve_model_section(cfg: DictConfig, manifest: dict) -> dict:
    """The model section with vocab_size and context_length filled in from the shard manifest."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.model is not None else {}
    cell = dict(model_cfg.get("cell") or {})
    vocab = manifest.get("vocabulary") or {}
    if cell.get("vocab_size") is None:
        if "size" not in vocab:
            raise InputError(
                cfg.data.manifest, "vocabulary.size", "the vocabulary size (or model.cell.vocab_size)", "missing"
            )
        cell["vocab_size"] = GENE_OFFSET + int(vocab["size"])
    elif "size" in vocab and int(cell["vocab_size"]) < GENE_OFFSET + int(vocab["size"]):
        raise InputError(
            None,
            "model.cell.vocab_size",
            f">= {GENE_OFFSET + int(vocab['size'])} for the shards' {vocab['size']} genes",
            cell["vocab_size"],
        )
    if cell.get("context_length") is None:
        tokens_cfg = (manifest.get("config") or {}).get("tokens") or {}
        if "context_length" not in tokens_cfg:
            raise InputError(
                cfg.data.manifest,
                "config.tokens.context_length",
                "the token context length (or model.cell.context_length)",
                "missing",
            )
        cell["context_length"] = int(tokens_cfg["context_length"])
    model_cfg["cell"] = cell
    return resolve_model_config(model_cfg)

"""Training the mIF head: MIPHEI's optimisation on the shared loop (:func:`finetune.training.fit`).

Per-marker weighted MSE (weights 1/std of the training targets, :func:`finetune.mif.model.weighted_mse`),
Adam (lr 2e-4, weight decay 1e-5) over the parameters that train, MIPHEI's schedule (linear warmup over
``warmup_steps``, constant to half of training, linear decay to 0: :func:`finetune.training.miphei_lr_lambda`),
gradient clipping at norm ``grad_clip``, bfloat16 autocast on CUDA with ``precision: bf16``.

Checkpoint selection: with a ``validate`` function (the mean validation Cell AUC of the model,
:class:`finetune.mif.evaluate.ValidationScorer`) and ``val_every`` > 0, training runs in segments of
``val_every`` steps on one optimiser and one schedule (the schedule of the whole run, offset per
segment), the model is scored after each segment and at the end, and the state with the best score is
restored at the end (its step and the scores are returned).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from finetune.training import fit, miphei_lr_lambda

from .data import MIFTileDataset
from .model import make_optimizer, weighted_mse

log = logging.getLogger(__name__)

NONFINITE_HINT = "lower train.lr, or check the targets in preprocess.json"


@dataclass
class Selection:
    """Which state training ended with: the best-scoring checkpoint on validation, or the last step."""

    step: int  # the step whose state the model holds
    score: float | None  # its validation score (None without validation)
    scores: dict[int, float] = field(default_factory=dict)  # step → validation score at each checkpoint

    def as_dict(self) -> dict:
        return {"step": self.step, "val_cell_auc": self.score, "checkpoints": dict(self.scores)}


def _changing_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what training changes: the trainable parameters and the buffers (frozen weights stay put)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def checkpoint_steps(n_steps: int, val_every: int) -> list[int]:
    """The steps after which the model is scored: every ``val_every`` steps and the last (only the last when 0)."""
    if val_every <= 0 or val_every >= n_steps:
        return [n_steps]
    return [*range(val_every, n_steps, val_every), n_steps]


def total_steps(n_train: int, train_cfg: Mapping[str, Any]) -> int:
    """Optimiser steps: ``train.steps``, else ``train.epochs`` × batches per epoch."""
    if train_cfg.get("steps"):
        return int(train_cfg["steps"])
    return int(train_cfg["epochs"]) * max(1, math.ceil(n_train / int(train_cfg["batch_size"])))


def train_model(
    model: torch.nn.Module,
    encoder: Any,
    dataset: MIFTileDataset,
    marker_std: Sequence[float],
    train_cfg: Mapping[str, Any],
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    desc: str = "mIF training",
    validate: Callable[[torch.nn.Module], float] | None = None,
    val_every: int = 0,
) -> tuple[pd.DataFrame, Selection]:
    """MIPHEI's optimisation (weighted MSE, Adam, warmup/constant/linear decay, clip 1); a per-step log
    (``step``, ``loss``, ``lr``, ``grad_norm``, ``val_cell_auc`` at checkpoints) and the checkpoint kept.

    ``encoder`` only normalises (and resizes) the uint8 H&E batches; ``model`` holds its own copy of the ViT.
    ``validate(model)`` → score (higher is better) selects the checkpoint (module docstring).
    """
    n_steps = total_steps(len(dataset), train_cfg)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=int(train_cfg["batch_size"]),
        shuffle=True,
        generator=generator,
        num_workers=int(train_cfg["num_workers"]),
        drop_last=len(dataset) > int(train_cfg["batch_size"]),
        persistent_workers=int(train_cfg["num_workers"]) > 0,
    )
    lr = float(train_cfg["lr"]) * (
        math.sqrt(int(train_cfg["batch_size"])) if train_cfg.get("scale_lr_by_sqrt_batch") else 1.0
    )
    optimiser = make_optimizer(model, lr=lr, weight_decay=float(train_cfg["weight_decay"]))
    std = torch.as_tensor(list(marker_std), dtype=torch.float32)
    model.to(device).train()

    def step(batch):
        images = encoder.preprocess(batch["he"]).to(device)  # (B, 3, h, w) normalised at the encoder's size
        target = batch["target"].to(device)  # (B, M, h, w) in [-0.9, 0.9]
        pred = model(images)  # (B, M, h, w)
        return weighted_mse(pred.float(), target, std), {}

    schedule = miphei_lr_lambda(n_steps, int(train_cfg["warmup_steps"]))
    ends = checkpoint_steps(n_steps, int(val_every)) if validate is not None else [n_steps]
    frames, scores, best_state, best = [], {}, None, (-math.inf, n_steps)
    done = 0
    for end in ends:
        history = fit(
            step,
            loader,
            optimiser,
            total_steps=end - done,
            lr_lambda=lambda s, offset=done: schedule(s + offset),
            grad_clip=float(train_cfg["grad_clip"]),
            precision=str(train_cfg.get("precision", "fp32")),
            device=device,
            check_finite=True,
            finite_hint=NONFINITE_HINT,
            progress=progress,
            desc=desc if len(ends) == 1 else f"{desc} (steps {done + 1}-{end})",
            log_every=max(1, int(train_cfg.get("log_every", 50))),
        )
        history = history[["step", "loss", "lr", "grad_norm"]].assign(step=history["step"] + done)
        done = end
        if validate is not None:
            score = float(validate(model))
            model.train()
            scores[end] = score
            history["val_cell_auc"] = math.nan
            history.loc[history.index[-1], "val_cell_auc"] = score
            log.info("%s step %d/%d: validation Cell AUC %.4f", desc, end, n_steps, score)
            if best_state is None or (math.isfinite(score) and score > best[0]):
                best, best_state = (score if math.isfinite(score) else -math.inf, end), _changing_state(model)
        frames.append(history)
    selection = Selection(n_steps, None)
    if validate is not None:
        if best[1] != n_steps:
            model.load_state_dict(best_state, strict=False)  # the keys come from this model
        selection = Selection(best[1], scores[best[1]], scores)
        log.info("%s: kept the checkpoint of step %d (validation Cell AUC %.4f)", desc, best[1], scores[best[1]])
    return pd.concat(frames, ignore_index=True), selection


__all__ = ["Selection", "checkpoint_steps", "total_steps", "train_model"]

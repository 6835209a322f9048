"""Training the mIF head: MIPHEI's optimisation on the shared loop (:func:`finetune.training.fit`).

Per-marker weighted MSE (weights 1/std of the training targets, :func:`finetune.mif.model.weighted_mse`),
Adam (lr 2e-4, weight decay 1e-5) over the parameters that train, MIPHEI's schedule (linear warmup over
``warmup_steps``, constant to half of training, linear decay to 0: :func:`finetune.training.miphei_lr_lambda`),
gradient clipping at norm ``grad_clip``, bfloat16 autocast on CUDA with ``precision: bf16``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from finetune.training import fit, miphei_lr_lambda

from .data import MIFTileDataset
from .model import make_optimizer, weighted_mse

NONFINITE_HINT = "lower train.lr, or check the targets in preprocess.json"


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
) -> pd.DataFrame:
    """MIPHEI's optimisation (weighted MSE, Adam, warmup/constant/linear decay, clip 1); a per-step log
    (``step``, ``loss``, ``lr``, ``grad_norm``).

    ``encoder`` only normalises (and resizes) the uint8 H&E batches; ``model`` holds its own copy of the ViT.
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

    history = fit(
        step,
        loader,
        optimiser,
        total_steps=n_steps,
        lr_lambda=miphei_lr_lambda(n_steps, int(train_cfg["warmup_steps"])),
        grad_clip=float(train_cfg["grad_clip"]),
        precision=str(train_cfg.get("precision", "fp32")),
        device=device,
        check_finite=True,
        finite_hint=NONFINITE_HINT,
        progress=progress,
        desc=desc,
        log_every=max(1, int(train_cfg.get("log_every", 50))),
    )
    return history[["step", "loss", "lr", "grad_norm"]]


__all__ = ["total_steps", "train_model"]

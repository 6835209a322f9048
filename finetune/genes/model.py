"""The gene heads: a ridge probe on frozen features, and end-to-end fine-tuning of encoder + linear head.

``linear_probe``: frozen encoder, embeddings computed once, ridge regression (closed form,
regularisation by generalised cross-validation on the training cells). ``finetune``: encoder and
head trained end to end (AdamW, MSE on per-gene standardised targets, the head initialised from the
ridge solution, random dihedral flips/rotations).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from torch import nn

from data_shards.sample import decode_jpeg

from ..augment import random_dihedral
from ..encoders import ImageEncoder
from ..training import epoch_means, fit


@dataclass
class LinearHead:
    """y (n, n_genes) = x (n, n_features) @ weight.T + bias, on raw (unstandardised) features."""

    weight: np.ndarray  # (n_genes, n_features)
    bias: np.ndarray  # (n_genes,)
    alpha: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (features @ self.weight.T + self.bias).astype(np.float32)

    def as_module(self) -> nn.Linear:
        linear = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(self.weight.astype(np.float32)))
            linear.bias.copy_(torch.from_numpy(self.bias.astype(np.float32)))
        return linear


def fit_linear_probe(
    features: np.ndarray, targets: np.ndarray, alphas: Sequence[float] = (1.0, 10.0, 100.0)
) -> LinearHead:
    """Ridge regression of (n, n_genes) targets on (n, n_features) standardised features.

    One regularisation strength for all genes, chosen by efficient leave-one-out (generalised)
    cross-validation on these cells; the standardisation is folded into the returned weights.
    """
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    ridge = RidgeCV(alphas=np.asarray(list(alphas), dtype=float)).fit((features - mean) / scale, targets)
    coef = np.atleast_2d(ridge.coef_) / scale  # (n_genes, n_features) on raw features
    bias = np.atleast_1d(ridge.intercept_) - coef @ mean
    return LinearHead(weight=coef, bias=bias, alpha=float(ridge.alpha_))


def finetune_end_to_end(
    encoder: ImageEncoder,
    head: LinearHead,
    jpegs: Sequence[bytes],
    targets: np.ndarray,
    train_rows: np.ndarray,
    cfg: Mapping[str, Any],
    seed: int = 0,
    progress: bool = True,
    desc: str = "finetune",
) -> tuple[ImageEncoder, nn.Linear, list[float]]:
    """Train a copy of ``encoder`` with a linear head (initialised from ``head``) on the training cells.

    Loss: mean squared error of per-gene standardised log-expression, so every gene counts the
    same (as in the mean-over-genes Pearson the task reports). AdamW, one step per batch, through
    the shared loop (:func:`finetune.training.fit`); with ``augment`` each crop gets a random
    flip/90° rotation (:func:`finetune.augment.random_dihedral`). Returns (encoder, head, epoch losses).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = copy.deepcopy(encoder).train()
    device = model.mean.device
    linear = head.as_module().to(device).train()
    y = torch.from_numpy(targets.astype(np.float32)).to(device)  # (n_cells, n_genes)
    y_sd = y[train_rows].std(dim=0).clamp_min(1e-3)  # (n_genes,)
    optimiser = torch.optim.AdamW(
        [
            {"params": model.backbone.parameters(), "lr": float(cfg["lr_backbone"])},
            {"params": linear.parameters(), "lr": float(cfg["lr_head"])},
        ],
        weight_decay=float(cfg["weight_decay"]),
    )
    batch_size, epochs = int(cfg["batch_size"]), int(cfg["epochs"])
    augment = cfg.get("augment", True)

    def batches(epoch: int) -> list[np.ndarray]:
        order = rng.permutation(train_rows)  # drawn when the epoch starts, before its flips
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def step(rows: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        images = [decode_jpeg(jpegs[i]) for i in rows]
        if augment:
            images = [random_dihedral(image, axes=(0, 1), rng=rng)[0] for image in images]  # (H, W, 3) crops
        x = model.preprocess(np.stack(images))  # (B, 3, h, w)
        predicted = linear(model.features(x))  # (B, n_genes)
        loss = (((predicted - y[torch.from_numpy(rows).to(device)]) / y_sd) ** 2).mean()
        return loss, {"n": len(rows)}

    history = fit(
        step,
        batches,
        optimiser,
        epochs=epochs,
        device=device,
        progress=progress,
        desc=desc,
        steps_per_epoch=int(np.ceil(len(train_rows) / batch_size)),
    )
    losses = [row["loss"] for row in epoch_means(history, ["loss"], weight="n")]
    return model.eval(), linear.eval(), losses


__all__ = ["LinearHead", "fit_linear_probe", "finetune_end_to_end"]

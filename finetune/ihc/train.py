"""Training the virtual-IHC generator: pix2pix's objective on the shared loop (:func:`finetune.training.fit`).

Adam (β 0.5, 0.999), λ·L1 (+ a conditional PatchGAN when ``gan.enabled``; none is built otherwise),
constant learning rate then linear decay to 0 over the last ``train.decay_fraction`` of the steps
(:func:`finetune.training.linear_decay_lambda`, applied to generator and discriminator alike).
One step: the discriminator's update first (on the detached fake), then the generator's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from finetune.training import epoch_means, fit, linear_decay_lambda

from .data import PairDataset
from .model import FiLMUNet, build_discriminator, discriminator_loss, generator_loss, patchgan_receptive_field_px

log = logging.getLogger(__name__)


def _set_requires_grad(module: torch.nn.Module | None, flag: bool) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


def generator_step(
    generator: FiLMUNet,
    he: torch.Tensor,
    ihc: torch.Tensor,
    embedding: torch.Tensor | None,
    l1_weight: float = 100.0,
    discriminator: torch.nn.Module | None = None,
    optimizer_d: torch.optim.Optimizer | None = None,
    gan_mode: str = "vanilla",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The step function of :func:`finetune.training.fit`: on he, ihc (B, 3, H, W) in [−1, 1], the discriminator's
    update (when there is one), then the generator's loss (λ·L1 [+ GAN]), not yet back-propagated.

    Returns (generator loss, its parts as floats: ``loss_d`` with a GAN, ``l1``, ``g_gan`` with a GAN, ``loss_g``).
    """
    fake = generator(he, embedding if generator.has_film else None)  # (B, 3, H, W)
    parts: dict[str, float] = {}
    fake_logits = None
    if discriminator is not None:
        optimizer_d.zero_grad(set_to_none=True)
        loss_d = discriminator_loss(discriminator(he, ihc), discriminator(he, fake.detach()), gan_mode)
        loss_d.backward()
        optimizer_d.step()
        parts["loss_d"] = float(loss_d.detach())
        # D is frozen while the graph of G's adversarial term is recorded, so G's backward (after this
        # function returns) leaves no gradient in D.
        _set_requires_grad(discriminator, False)
        try:
            fake_logits = discriminator(he, fake)
        finally:
            _set_requires_grad(discriminator, True)
    loss_g, g_parts = generator_loss(fake, ihc, l1_weight, fake_logits, gan_mode)
    return loss_g, {**parts, **g_parts, "loss_g": float(loss_g.detach())}


def train_step(
    generator: FiLMUNet,
    optimizer_g: torch.optim.Optimizer,
    he: torch.Tensor,
    ihc: torch.Tensor,
    embedding: torch.Tensor | None,
    l1_weight: float = 100.0,
    discriminator: torch.nn.Module | None = None,
    optimizer_d: torch.optim.Optimizer | None = None,
    gan_mode: str = "vanilla",
) -> dict:
    """One pix2pix step outside the loop: :func:`generator_step`, then the generator's update.

    Returns the losses as floats (``l1``, ``loss_g`` and with a GAN ``g_gan``, ``loss_d``).
    """
    loss_g, parts = generator_step(generator, he, ihc, embedding, l1_weight, discriminator, optimizer_d, gan_mode)
    optimizer_g.zero_grad(set_to_none=True)
    loss_g.backward()
    optimizer_g.step()
    return parts


def fit_generator(
    generator: FiLMUNet,
    dataset: PairDataset,
    train_cfg: Mapping[str, Any],
    gan_cfg: Mapping[str, Any],
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> tuple[FiLMUNet, torch.nn.Module | None, list[dict]]:
    """Train ``generator`` (and a PatchGAN when ``gan_cfg.enabled``; none is built otherwise).

    Returns (generator, discriminator or None, per-epoch mean losses).
    """
    torch.manual_seed(seed)
    generator.to(device).train()
    lr, betas = float(train_cfg["lr"]), tuple(float(b) for b in train_cfg["betas"])
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    discriminator = optimizer_d = None
    if bool(gan_cfg.get("enabled", False)):
        discriminator = build_discriminator(dict(gan_cfg)).to(device).train()
        optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=float(gan_cfg.get("lr") or lr), betas=betas)
        log.info(
            "%s: pix2pix with a %d×%d px PatchGAN (%s)",
            desc,
            *(2 * [patchgan_receptive_field_px(discriminator.n_layers)]),
            gan_cfg.get("mode", "vanilla"),
        )
    loader = DataLoader(
        dataset,
        batch_size=int(train_cfg["batch_size"]),
        shuffle=True,
        num_workers=int(train_cfg.get("num_workers", 0)),
        generator=torch.Generator().manual_seed(seed),
        pin_memory=device.type == "cuda",
    )
    epochs = int(train_cfg["epochs"])
    total = epochs * len(loader)
    l1_weight, gan_mode = float(train_cfg["l1_weight"]), gan_cfg.get("mode", "vanilla")

    def step(batch):
        he, ihc, embedding = batch
        return generator_step(
            generator,
            he.to(device),
            ihc.to(device),
            embedding.to(device),
            l1_weight,
            discriminator,
            optimizer_d,
            gan_mode,
        )

    steps = fit(
        step,
        loader,
        optimizer_g,
        epochs=epochs,
        lr_lambda=linear_decay_lambda(total, float(train_cfg.get("decay_fraction", 0.5))),
        aux_optimizers=[optimizer_d] if optimizer_d is not None else [],
        device=device,
        progress=progress,
        desc=desc,
        postfix="l1",
    )
    history = epoch_means(steps)
    log.info("%s: %d epochs, %d steps, last epoch L1 %.4f", desc, epochs, total, history[-1]["l1"])
    return generator.eval(), discriminator, history


__all__ = ["generator_step", "train_step", "fit_generator"]

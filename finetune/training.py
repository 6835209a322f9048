"""The one training loop of the fine-tuning heads, and their learning-rate schedules.

Every head trains the same way: draw a batch, compute a loss, back-propagate, (clip), step the
optimiser and its schedule, record what happened. The head says what a step is; :func:`fit` does
the rest::

    def step(batch) -> tuple[torch.Tensor, dict[str, float]]:
        he, target = batch
        loss = criterion(model(he.to(device)), target.to(device))
        return loss, {"l1": float(loss.detach())}          # extra scalars for the history

    history = fit(step, loader, optimizer, epochs=10, lr_lambda=linear_decay_lambda(total, 0.5),
                  grad_clip=1.0, device=device, desc="train")

Per batch, in this order (the order fixes the numbers a seeded run produces):

1. ``loss, scalars = step_fn(batch)`` (under ``torch.autocast`` when ``precision="bf16"`` on CUDA;
   losses should be computed from ``.float()`` outputs);
2. with ``check_finite``: a non-finite loss raises :class:`FloatingPointError` naming the step;
3. ``(loss / accumulation).backward()``;
4. every ``accumulation`` batches and at the end of every epoch: clip the gradient norm of the
   optimiser's parameters to ``grad_clip``, ``optimizer.step()``, advance the LR schedule of
   ``optimizer`` and of every ``aux_optimizers`` entry, ``optimizer.zero_grad()``.

Auxiliary optimisers (a GAN's discriminator) are stepped by ``step_fn`` itself, which sees the
batch first; :func:`fit` only advances their schedules with the main one.

``batches`` is an iterable re-iterated once per epoch (a ``DataLoader``) or a function
``epoch -> iterable`` (a fresh permutation per epoch). Training runs for ``epochs`` passes, or for
``total_steps`` batches over as many passes as it takes (the pass in progress is cut short).

The history is one row per batch: ``step`` (1-based batch count), ``epoch`` (1-based), ``loss``,
``lr`` (the main optimiser's first group's rate used for this batch), ``grad_norm`` (the norm
before clipping, on batches that stepped with ``grad_clip`` set; NaN otherwise) and the step's own
scalars. :func:`epoch_means` turns it into per-epoch means.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common.errors import InputError

log = logging.getLogger(__name__)

StepFn = Callable[[Any], tuple[torch.Tensor, Mapping[str, float]]]
PRECISIONS = ("fp32", "bf16")
HISTORY_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm")


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules (multipliers of the base rate per optimiser step, for ``LambdaLR``)


def linear_decay_lambda(total_steps: int, decay_fraction: float) -> Callable[[int], float]:
    """pix2pix schedule: constant, then linear decay to 0 over the last ``decay_fraction`` of the steps."""
    decay_steps = int(round(total_steps * decay_fraction))
    start = total_steps - decay_steps

    def factor(step: int) -> float:
        if decay_steps == 0 or step < start:
            return 1.0
        return max(0.0, 1.0 - (step - start) / decay_steps)

    return factor


def miphei_lr_lambda(total_steps: int, warmup_steps: int = 400) -> Callable[[int], float]:
    """LR multiplier per step (for ``LambdaLR``): 0 → 1 linearly over ``warmup_steps``, 1 until half of
    training, then linearly to 0 at ``total_steps`` (MIPHEI ``src/utils.py::pix2pix_lr_scheduler``).

    Short runs (``total_steps < 2 · warmup_steps``): the warmup is cut to the first half of
    training, so the schedule becomes a triangle (up over the first half, down over the second)
    that still reaches the full learning rate once and still ends at 0.
    """
    total = int(total_steps)
    if total < 1:
        raise InputError(None, "train.total_steps", "a positive number of optimiser steps", total_steps)
    if int(warmup_steps) < 0:
        raise InputError(None, "train.warmup_steps", "a non-negative number of steps", warmup_steps)
    decay_start = total // 2
    warmup = min(int(warmup_steps), decay_start)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return step / warmup
        if step < decay_start:
            return 1.0
        return max(0.0, 1.0 - (step - decay_start) / max(1, total - decay_start))

    return lr_lambda


# ---------------------------------------------------------------------------------------------
# The loop


def autocast(device: torch.device | str, precision: str = "fp32"):
    """``torch.autocast`` to bfloat16 when ``precision == "bf16"`` on CUDA; a no-op context otherwise."""
    device = torch.device(device)
    enabled = precision == "bf16" and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def fit(
    step_fn: StepFn,
    batches: Iterable | Callable[[int], Iterable],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int | None = None,
    total_steps: int | None = None,
    lr_lambda: Callable[[int], float] | None = None,
    aux_optimizers: Sequence[torch.optim.Optimizer] = (),
    grad_clip: float | None = None,
    accumulation: int = 1,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    check_finite: bool = False,
    finite_hint: str = "",
    progress: bool = True,
    desc: str = "train",
    steps_per_epoch: int | None = None,
    postfix: str | None = "loss",
    log_every: int | None = None,
) -> pd.DataFrame:
    """Train with ``step_fn`` over ``batches`` (module docstring); returns the per-batch history.

    Exactly one of ``epochs`` (passes over ``batches``) and ``total_steps`` (batches) is given.
    ``steps_per_epoch`` sizes the progress bar when ``batches`` has no ``len`` (a function).
    ``postfix`` names the history column shown on the progress bar; ``log_every`` logs the mean
    loss of the last that many batches every that many batches (and at the last one).
    """
    if (epochs is None) == (total_steps is None):
        raise ValueError("fit: give exactly one of epochs and total_steps")
    if precision not in PRECISIONS:
        raise InputError(None, "train.precision", " or ".join(PRECISIONS), precision)
    accumulation = int(accumulation)
    if accumulation < 1:
        raise InputError(None, "train.grad_accumulation", "a positive integer", accumulation)
    schedulers = (
        [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for o in (optimizer, *aux_optimizers)]
        if lr_lambda is not None
        else []
    )
    params = _optimizer_params(optimizer) if grad_clip is not None else []
    per_epoch = (
        steps_per_epoch
        if steps_per_epoch is not None
        else (None if callable(batches) else len(batches) if hasattr(batches, "__len__") else None)
    )
    bar_total = (
        int(total_steps) if total_steps is not None else (None if per_epoch is None else int(epochs) * int(per_epoch))
    )
    rows: list[dict[str, Any]] = []
    step, epoch, pending = 0, 0, 0

    def optimizer_step() -> float:
        norm = float("nan")
        if grad_clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, float(grad_clip)))
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def more() -> bool:
        return epoch < int(epochs) if total_steps is None else step < int(total_steps)

    with tqdm(total=bar_total, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        while more():
            optimizer.zero_grad(set_to_none=True)
            pending, drawn = 0, 0
            for batch in batches(epoch) if callable(batches) else batches:
                if total_steps is not None and step >= int(total_steps):
                    break
                drawn += 1
                with autocast(device, precision):
                    loss, scalars = step_fn(batch)
                if check_finite and not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{desc}: non-finite loss at step {step + 1}" + (f" ({finite_hint})" if finite_hint else "")
                    )
                (loss / accumulation if accumulation != 1 else loss).backward()
                lr = optimizer.param_groups[0]["lr"]
                step += 1
                pending += 1
                row = {
                    "step": step,
                    "epoch": epoch + 1,
                    "loss": float(loss.detach()),
                    "lr": lr,
                    "grad_norm": float("nan"),
                    **scalars,
                }
                if pending == accumulation:
                    row["grad_norm"] = optimizer_step()
                    pending = 0
                rows.append(row)
                bar.update(1)
                if postfix is not None and postfix in row:
                    bar.set_postfix({postfix: f"{row[postfix]:.4f}"})
                if log_every and (step % int(log_every) == 0 or step == total_steps):
                    window = [r["loss"] for r in rows[-int(log_every) :]]
                    log.info(
                        "%s step %d/%s: loss %.4f (mean of last %d), lr %.2e",
                        desc,
                        step,
                        total_steps if total_steps is not None else bar_total,
                        float(np.mean(window)),
                        len(window),
                        lr,
                    )
            if pending:  # the epoch's last, partial accumulation window
                rows[-1]["grad_norm"] = optimizer_step()
                pending = 0
            if drawn == 0 and total_steps is not None and step < int(total_steps):
                raise InputError(None, "batches", "at least one batch per epoch", "an empty epoch")
            epoch += 1
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=list(HISTORY_COLUMNS))
    return frame


def epoch_means(
    history: pd.DataFrame, columns: Sequence[str] | None = None, weight: str | None = None
) -> list[dict[str, Any]]:
    """Per-epoch means of ``columns`` (default: the step's own scalars): ``[{"epoch": e, column: mean}]``.

    With ``weight`` (a column such as the batch's sample count) the mean is weighted by it.
    Sums run in step order, so the figures equal a running total kept during training.
    """
    if columns is None:
        columns = [c for c in history.columns if c not in HISTORY_COLUMNS and c != weight]
    out: list[dict[str, Any]] = []
    for epoch, part in history.groupby("epoch", sort=True):
        records = part.to_dict(orient="records")
        row: dict[str, Any] = {"epoch": int(epoch)}
        for column in columns:
            total, denominator = 0.0, 0
            for record in records:
                value = record[column]
                if weight is None:
                    total += value
                    denominator += 1
                else:
                    total += value * record[weight]
                    denominator += record[weight]
            row[column] = total / denominator if denominator else float("nan")
        out.append(row)
    return out


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Temporarily set torch's intra-op threads; tiny models run fastest on one."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


__all__ = [
    "fit",
    "epoch_means",
    "autocast",
    "linear_decay_lambda",
    "miphei_lr_lambda",
    "torch_threads",
    "StepFn",
    "PRECISIONS",
    "HISTORY_COLUMNS",
]

"""Learning-rate schedule: linear warm-up from a small start value to the peak, then cosine decay.

PAST: AdamW, learning rate warmed up linearly from 1e-6 to the peak (1e-3) over the first epoch,
then cosine. ``step`` counts optimizer steps already taken, so ``step = 0`` is the first update.

    step ∈ [0, warmup]:       lr = start + (peak − start) · step / warmup
    step ∈ [warmup, total]:   lr = final + (peak − final) · ½ (1 + cos(π · (step − warmup) / (total − warmup)))
    step > total:             lr = final

The loss's target mix λ (``loss.target_mix``) follows its own linear ramp, :func:`target_mix_at`.

The scheduler object derives the rate from the step alone (its state is the step), so a resumed
run sets exactly the rate an uninterrupted run would have at that step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from common.errors import InputError


def warmup_cosine_lr(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    start_lr: float = 1e-6,
    final_lr: float = 0.0,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a warm-up + cosine schedule."""
    if step < 0:
        raise InputError(None, "step", "a non-negative optimizer step", step)
    if warmup_steps > 0 and step < warmup_steps:
        return start_lr + (peak_lr - start_lr) * step / warmup_steps
    if step >= total_steps:
        return final_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1): here total > step >= warmup
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_schedule(peak_lr: float, warmup_steps: int, total_steps: int, start_lr: float, final_lr: float) -> None:
    """Raise InputError on an impossible schedule (names the config keys under ``train``)."""
    if not peak_lr > 0:
        raise InputError(None, "train.lr", "a positive peak learning rate", peak_lr)
    if not 0 <= start_lr <= peak_lr:
        raise InputError(None, "train.start_lr", f"0 <= start_lr <= peak lr ({peak_lr})", start_lr)
    if not 0 <= final_lr <= peak_lr:
        raise InputError(None, "train.final_lr", f"0 <= final_lr <= peak lr ({peak_lr})", final_lr)
    if warmup_steps < 0 or total_steps < 1:
        raise InputError(None, "train", "warm-up steps >= 0 and total steps >= 1", (warmup_steps, total_steps))


def target_mix_at(step: int, start: float, end: float, ramp_steps: int) -> float:
    """λ for the loss at optimizer step ``step`` (0-based): linear from start to end over ramp_steps, then end."""
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= float(value) <= 1.0:
            raise InputError(None, f"loss.target_mix.{name}", "a number in [0, 1]", value)
    if ramp_steps <= 0 or step >= ramp_steps:
        return float(end)
    return float(start) + (float(end) - float(start)) * step / ramp_steps


class WarmupCosineSchedule(LambdaLR):
    """torch's ``LambdaLR`` with the warm-up + cosine rate as its factor; DeepSpeed calls ``step()``.

    ``LambdaLR`` sets each group's rate to (its base rate) × factor(step). Here the base rate of a
    group is its ``lr_scale`` (default 1) and the factor is the scheduled rate itself, so a group
    runs at ``lr_scale × warmup_cosine_lr(step)``. ``state_dict`` holds only the step: the
    hyper-parameters come from the run's config, so a resumed run may change them.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        peak_lr: float,
        warmup_steps: int,
        total_steps: int,
        start_lr: float = 1e-6,
        final_lr: float = 0.0,
        step: int = 0,
    ):
        check_schedule(peak_lr, warmup_steps, total_steps, start_lr, final_lr)
        self.peak_lr = peak_lr
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.start_lr = start_lr
        self.final_lr = final_lr
        for group in optimizer.param_groups:
            group["initial_lr"] = group.get("lr_scale", 1.0)  # LambdaLR's base rate of the group
        super().__init__(optimizer, self.lr_at)  # sets the rates of step 0
        if step:
            self.set_step(step)

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(
            step,
            peak_lr=self.peak_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            start_lr=self.start_lr,
            final_lr=self.final_lr,
        )

    @property
    def lr(self) -> float:
        """The rate the next optimizer step will use (for ``lr_scale`` 1)."""
        return self.lr_at(self.last_epoch)

    def set_step(self, step: int) -> None:
        """Jump to optimizer step ``step`` (a resume): the rates an uninterrupted run has there."""
        self.last_epoch = int(step)
        rate = self.lr_at(self.last_epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * rate  # the product LambdaLR.step computes
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.set_step(int(state["step"]))

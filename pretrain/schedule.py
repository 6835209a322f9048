"""Learning-rate schedule: linear warm-up from a small start value to the peak, then cosine decay.

PAST: AdamW, learning rate warmed up linearly from 1e-6 to the peak (1e-3) over the first epoch,
then cosine. ``step`` counts optimizer steps already taken, so ``step = 0`` is the first update.

    step ∈ [0, warmup]:       lr = start + (peak − start) · step / warmup
    step ∈ [warmup, total]:   lr = final + (peak − final) · ½ (1 + cos(π · (step − warmup) / (total − warmup)))
    step > total:             lr = final

The scheduler object derives the rate from the step alone (its state is the step), so a resumed
run sets exactly the rate an uninterrupted run would have at that step.
"""
from __future__ import annotations

import math
from typing import Any

from data_shards.errors import InputError


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


class WarmupCosineSchedule:
    """Sets the optimizer's learning rate from the optimizer step; DeepSpeed calls ``step()``.

    Each parameter group may carry an ``lr_scale`` (default 1) multiplying the scheduled rate.
    ``state_dict`` holds only the step: the hyper-parameters come from the run's config.
    """

    def __init__(
        self,
        optimizer: Any,
        *,
        peak_lr: float,
        warmup_steps: int,
        total_steps: int,
        start_lr: float = 1e-6,
        final_lr: float = 0.0,
        step: int = 0,
    ):
        check_schedule(peak_lr, warmup_steps, total_steps, start_lr, final_lr)
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.start_lr = start_lr
        self.final_lr = final_lr
        self.last_step = int(step)
        self._apply()

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(
            step, peak_lr=self.peak_lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
            start_lr=self.start_lr, final_lr=self.final_lr,
        )

    @property
    def lr(self) -> float:
        """The rate the next optimizer step will use."""
        return self.lr_at(self.last_step)

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self, *_: Any, **__: Any) -> None:
        """One optimizer step was taken: move to the next step's rate."""
        self.last_step += 1
        self._apply()

    def set_step(self, step: int) -> None:
        self.last_step = int(step)
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        return self.get_last_lr()

    def state_dict(self) -> dict:
        return {"step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.set_step(int(state["step"]))

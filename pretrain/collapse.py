"""A guard against the contrastive loss's collapsed fixed point.

When every embedding of a modality is the same, every logit row is uniform and the loss equals
ln(B) exactly, B the pairs each loss sees (world size × micro batch), whatever the targets are
(a cross-entropy of uniform predictions against rows that sum to 1). That is a stationary
point the PAST objective can fall into (``loss.detach_targets`` in configs/pretrain/*.yaml); a
learning run leaves it within its first epoch. The guard watches the loss of every optimizer
step after the warm-up:

- ``window_steps`` consecutive steps with |loss − ln B| < ``epsilon``: one warning in the log,
  and ``train/collapsed`` = 1 in TensorBoard from then on (0 before and after);
- ``stop_after_steps`` consecutive such steps: :class:`CollapseError`, naming the figures and
  the settings that decide it.

The loss is the same number on every rank (pretrain.loss returns the global value), so every
rank decides the same and they stop together.
"""

from __future__ import annotations

import logging
import math

from common.errors import InputError

log = logging.getLogger(__name__)


class CollapseError(RuntimeError):
    """The loss sat at ln(batch) for loss.collapse_guard.stop_after_steps steps."""


class CollapseGuard:
    """Counts consecutive post-warm-up steps whose loss is within ``epsilon`` of ln(pairs per loss)."""

    def __init__(
        self,
        pairs_per_loss: int,
        warmup_steps: int,
        epsilon: float = 0.01,
        window_steps: int = 100,
        stop_after_steps: int | None = 1000,
        enabled: bool = True,
    ):
        if pairs_per_loss < 2:
            raise InputError(None, "global micro batch", "at least 2 pairs per loss", pairs_per_loss)
        if not epsilon > 0 or window_steps < 1:
            raise InputError(
                None,
                "loss.collapse_guard.epsilon/window_steps",
                "a positive epsilon (nats) and window_steps >= 1",
                (epsilon, window_steps),
            )
        if stop_after_steps and stop_after_steps < window_steps:
            raise InputError(
                None,
                "loss.collapse_guard.stop_after_steps",
                f">= window_steps ({window_steps}), or 0/null to only warn",
                stop_after_steps,
            )
        self.ln_pairs = math.log(pairs_per_loss)
        self.pairs = pairs_per_loss
        self.warmup_steps = int(warmup_steps)
        self.epsilon = float(epsilon)
        self.window_steps = int(window_steps)
        self.stop_after_steps = int(stop_after_steps or 0)
        self.enabled = bool(enabled)
        self.run = 0  # consecutive collapsed steps so far
        self.warned = False
        self.flagged_steps = 0  # steps of the run flagged as collapsed

    @property
    def collapsed(self) -> bool:
        """The loss has sat at ln(B) for at least window_steps steps, up to now."""
        return self.enabled and self.run >= self.window_steps

    def update(self, step: int, loss: float) -> bool:
        """Feed the loss of optimizer step ``step`` (1-based, after it was taken); True while collapsed.

        Raises CollapseError once the collapse has lasted stop_after_steps steps."""
        if not self.enabled or step <= self.warmup_steps:
            return False
        if math.isfinite(loss) and abs(loss - self.ln_pairs) < self.epsilon:
            self.run += 1
        else:
            if self.warned and self.run >= self.window_steps:
                log.warning("step %d: the loss (%.4f) left ln(%d) = %.4f again", step, loss, self.pairs, self.ln_pairs)
            self.run = 0
        if self.run < self.window_steps:
            return False
        self.flagged_steps += 1
        if self.run == self.window_steps:
            self.warned = True
            log.warning(
                "COLLAPSE: the loss has been within %.3g of ln(%d) = %.4f (uniform logits: every embedding alike) "
                "for the last %d steps (up to step %d). The run stops if it lasts %s steps "
                "(loss.collapse_guard). See loss.detach_targets and loss.target_mix in the config.",
                self.epsilon,
                self.pairs,
                self.ln_pairs,
                self.run,
                step,
                self.stop_after_steps or "∞ (stop_after_steps: 0 only warns)",
            )
        if self.stop_after_steps and self.run >= self.stop_after_steps:
            raise CollapseError(
                f"training collapsed: the loss stayed within {self.epsilon:g} of ln({self.pairs}) = "
                f"{self.ln_pairs:.4f} (every logit alike: the embeddings of a modality are all the same) for "
                f"{self.run} consecutive steps up to step {step}, after the warm-up "
                f"(loss.collapse_guard.stop_after_steps = {self.stop_after_steps}). A checkpoint of this run "
                "would not be worth resuming; check loss.detach_targets (false learns from random init), "
                "loss.target_mix and train.lr."
            )
        return True

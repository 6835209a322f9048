"""Controls that make an encoder comparison mean something.

A head's figure for one encoder says little by itself: on small or easy data an untrained encoder
can score as well as a pretrained one, and the spread between random seeds can exceed the gain.
So every comparison here runs against controls and reports intervals:

- **oracle** (positive control): the same head on the planted truth (the cell's state or type, not
  the image); if the evaluation cannot tell it from random encoders it cannot tell anything, and the
  encoder comparison is withheld (:func:`gate`);
- **random encoders** (negative control): the same architecture at several random seeds, reported
  as mean ± sd; the pretrained encoder is compared with their mean;
- **shuffled oracle** (a control that must fail): the oracle's labels permuted between cells; it must
  not beat random, or the harness finds signal where there is none;
- **intervals**: a block bootstrap — the test set cut into spatially compact blocks (k-means on
  µm positions, per slide), blocks resampled with replacement, the metric recomputed on the pooled
  cells of each resample, the same resamples for every run so differences are paired. The 95 %
  interval of a difference that holds 0 is reported as "no detectable gain".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

LEVEL = 0.95


def spatial_blocks(xy_um: np.ndarray, slides: np.ndarray, n_blocks: int, seed: int = 0) -> np.ndarray:
    """int (n,) block id of each cell: k-means on the µm positions within each slide (ids unique across slides).

    Neighbouring cells share morphology and expression, so resampling single cells would count one
    patch of tissue many times over; resampling blocks of neighbouring cells keeps that dependence.
    """
    xy_um = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    slides = np.asarray(slides)
    blocks = np.zeros(len(xy_um), dtype=np.int64)
    next_id = 0
    names = list(dict.fromkeys(slides.tolist()))
    per_slide = max(1, n_blocks // max(1, len(names)))
    for name in names:
        rows = np.flatnonzero(slides == name)
        k = int(min(per_slide, len(rows)))
        labels = KMeans(k, n_init=3, random_state=seed).fit_predict(xy_um[rows]) if k > 1 else np.zeros(len(rows))
        blocks[rows] = next_id + labels.astype(np.int64)
        next_id += k
    return blocks


def block_bootstrap(
    metric: Callable[[np.ndarray], float],
    blocks: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """(n_boot,) values of ``metric(rows)`` over block resamples (rows: the cells of the drawn blocks).

    The resamples depend only on ``blocks``, ``n_boot`` and ``seed``: two calls with the same three
    draw the same rows, so their replicates are paired.
    """
    ids = np.unique(blocks)
    members = [np.flatnonzero(blocks == b) for b in ids]
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for i in range(n_boot):
        drawn = rng.integers(0, len(ids), len(ids))
        out[i] = metric(np.concatenate([members[d] for d in drawn]))
    return out


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (NaN replicates ignored)."""
    finite = np.asarray(replicates, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class Difference:
    """A paired difference of one metric between two runs: estimate, interval, bootstrap p."""

    estimate: float
    low: float
    high: float
    p: float  # two-sided: twice the share of replicates on the other side of 0 (capped at 1)

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def as_dict(self) -> dict:
        return {"delta": self.estimate, "ci_low": self.low, "ci_high": self.high, "p_bootstrap": self.p}

    def describe(self, what: str = "Δ") -> str:
        return f"{what} = {self.estimate:+.3f} [95% CI {self.low:+.3f}, {self.high:+.3f}]"


def difference(estimate: float, replicates_a: np.ndarray, replicates_b: np.ndarray) -> Difference:
    """``a - b`` from paired replicates (same resamples): the point estimate given, interval and p from them."""
    diff = np.asarray(replicates_a) - np.asarray(replicates_b)
    diff = diff[np.isfinite(diff)]
    low, high = interval(diff)
    side = (diff <= 0).mean() if estimate > 0 else (diff >= 0).mean()
    return Difference(float(estimate), low, high, float(min(1.0, 2 * side)) if len(diff) else float("nan"))


@dataclass
class Gate:
    """Whether the harness separates the oracle from random encoders (and the shuffled oracle does not)."""

    oracle_vs_random: Difference
    shuffled_vs_random: Difference | None

    @property
    def passes(self) -> bool:
        shuffled_ok = self.shuffled_vs_random is None or not (
            self.shuffled_vs_random.excludes_zero and self.shuffled_vs_random.estimate > 0
        )
        return bool(self.oracle_vs_random.excludes_zero and self.oracle_vs_random.estimate > 0 and shuffled_ok)

    def describe(self) -> str:
        lines = [f"oracle vs random: {self.oracle_vs_random.describe()}"]
        if self.shuffled_vs_random is not None:
            lines.append(f"shuffled oracle vs random (must not be > 0): {self.shuffled_vs_random.describe()}")
        verdict = (
            "controls pass: the evaluation separates the planted truth from random encoders"
            if self.passes
            else "controls FAIL: this evaluation cannot separate the planted truth from random encoders "
            "(or finds signal in shuffled labels); encoder comparisons are withheld"
        )
        return "\n".join([*lines, verdict])

    def as_dict(self) -> dict:
        return {
            "passes": self.passes,
            "oracle_vs_random": self.oracle_vs_random.as_dict(),
            "shuffled_vs_random": self.shuffled_vs_random.as_dict() if self.shuffled_vs_random else None,
        }


def gate(
    oracle: tuple[float, np.ndarray],
    random_mean: tuple[float, np.ndarray],
    shuffled: tuple[float, np.ndarray] | None = None,
) -> Gate:
    """The controls' verdict from (estimate, replicates) of the oracle, the random mean and the shuffled oracle."""
    versus = difference(oracle[0] - random_mean[0], oracle[1], random_mean[1])
    shuffled_diff = difference(shuffled[0] - random_mean[0], shuffled[1], random_mean[1]) if shuffled else None
    return Gate(versus, shuffled_diff)


def verdict(name: str, diff: Difference, baseline: str = "random encoders") -> str:
    """One line: does ``name`` beat ``baseline``, with the interval; "no detectable gain" when it holds 0."""
    if diff.excludes_zero and diff.estimate > 0:
        return f"{name} beats {baseline}: {diff.describe()}, p = {diff.p:.2g}"
    if diff.excludes_zero:
        return f"{name} is WORSE than {baseline}: {diff.describe()}, p = {diff.p:.2g}"
    return f"{name}: no detectable gain over {baseline} ({diff.describe()} holds 0)"


def mean_and_sd(values: Mapping[str, float]) -> tuple[float, float]:
    """Mean and sample sd (ddof 1; 0 for one value) of the values of several seeds."""
    array = np.asarray(list(values.values()), dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


__all__ = [
    "LEVEL",
    "Difference",
    "Gate",
    "block_bootstrap",
    "difference",
    "gate",
    "interval",
    "mean_and_sd",
    "spatial_blocks",
    "verdict",
]

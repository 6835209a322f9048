"""Controls of the mIF head's encoder comparison (:mod:`finetune.controls` applied to the Cell AUC).

The score compared is the mean over the cell markers of the Cell AUC (:func:`finetune.mif.evaluate.roc_auc`
of each test nucleus's score against its gated label). Runs are the rows of the comparison:

- **oracle** (positive control, and the ceiling of the data): the score of a nucleus is 1 when its planted
  cell type expresses the marker, 0 otherwise (the synthetic set's ``truth.json``: ``tiles.<tile>.cell_types``,
  entry k − 1 for label k, and ``expressed_by``). Its AUC is the best a predictor that knows each cell's
  type can reach against the gated labels (flips and gating errors keep it under 1);
- **shuffled oracle** (a control that must fail): the oracle's rows permuted between the test cells;
- **random encoders** (negative control): the same head trained on random-weight ViTs, mean ± sd over seeds;
- the **pretrained encoder**.

Intervals: a block bootstrap with the test *tiles* as blocks (cells of a tile share tissue and
staining), the same resamples for every run, so differences are paired
(:func:`finetune.controls.block_bootstrap`). The gate (:func:`finetune.controls.gate`) must pass — the
oracle above random with a 95 % interval excluding 0, the shuffled oracle not above random — before the
pretrained-vs-random verdict is printed; without planted truth (real data) there is no gate and the
comparison is printed with that said.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import InputError
from finetune.controls import block_bootstrap, difference, gate, interval, mean_and_sd, verdict

TRUTH_NAME = "truth.json"  # written by finetune.synthetic.mif next to the tiles


def read_planted(root: str | Path) -> dict | None:
    """The synthetic set's planted truth (``truth.json``), or None for real data (no such file)."""
    path = Path(root) / TRUTH_NAME
    if not path.is_file():
        return None
    truth = json.loads(path.read_text(encoding="utf-8"))
    for key in ("tiles", "expressed_by"):
        if key not in truth:
            raise InputError(path, key, "the planted truth written by finetune.synthetic.mif", "missing")
    return truth


def oracle_scores(cells: pd.DataFrame, truth: Mapping, markers: Sequence[str]) -> np.ndarray:
    """(n, M) 1.0 where the planted type of the cell (``tile``, ``label`` of ``cells``) expresses the marker, else 0."""
    out = np.zeros((len(cells), len(markers)))
    tiles, labels = cells["tile"].astype(str).to_numpy(), cells["label"].to_numpy(np.int64)
    for name in np.unique(tiles):
        if name not in truth["tiles"]:
            raise InputError(Path(TRUTH_NAME), f"tiles.{name}", "the planted types of every test tile", "missing")
        types = np.asarray(truth["tiles"][name]["cell_types"], dtype=str)
        rows = np.flatnonzero(tiles == name)
        if labels[rows].max(initial=0) > len(types):
            raise InputError(Path(TRUTH_NAME), f"tiles.{name}.cell_types", "one type per nucleus label", len(types))
        kinds = types[labels[rows] - 1]
        for m, marker in enumerate(markers):
            expressed_by = truth["expressed_by"].get(marker)
            if expressed_by is None:
                raise InputError(Path(TRUTH_NAME), f"expressed_by.{marker}", "the types expressing each marker", None)
            out[rows, m] = 1.0 if expressed_by == "all" else np.isin(kinds, list(expressed_by)).astype(float)
    return out


def shuffled_rows(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """``scores`` with its rows (cells) permuted: each cell gets another cell's planted type."""
    return scores[np.random.default_rng(seed).permutation(len(scores))]


class CellAUC:
    """Mean over markers of the Cell AUC of fixed per-cell ``scores`` (n, M) against ``labels`` (n, M), on any
    multiset of rows: ``self(rows)`` (``rows`` may repeat cells, as a bootstrap resample does; None = all).

    Each marker's scores are ranked once; a resample only re-weights the cells (how often each is drawn),
    so the AUC — the share of (positive, negative) pairs ordered right, ties counted half — is a few
    weighted sums per marker, equal to :func:`finetune.mif.evaluate.roc_auc` on the repeated rows. Markers
    without both classes among the rows are left out (NaN when none has both).
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray):
        scores = np.asarray(scores, np.float64)
        labels = np.asarray(labels, np.float64)
        if scores.shape != labels.shape or scores.ndim != 2:
            raise InputError(None, "scores", f"(n cells, n markers) like the labels {labels.shape}", scores.shape)
        self.n = len(scores)
        self.markers = []
        for m in range(scores.shape[1]):
            groups, inverse = np.unique(scores[:, m], return_inverse=True)  # ascending score groups (ties)
            valid = np.isfinite(labels[:, m])
            positive = (valid & (labels[:, m] > 0.5)).astype(np.float64)
            negative = (valid & (labels[:, m] <= 0.5)).astype(np.float64)
            self.markers.append((inverse.ravel(), len(groups), positive, negative))

    def __call__(self, rows: np.ndarray | None = None) -> float:
        weight = np.ones(self.n) if rows is None else np.bincount(rows, minlength=self.n).astype(np.float64)
        values = []
        for inverse, n_groups, positive, negative in self.markers:
            pos = np.bincount(inverse, weights=weight * positive, minlength=n_groups)
            neg = np.bincount(inverse, weights=weight * negative, minlength=n_groups)
            n_pos, n_neg = pos.sum(), neg.sum()
            if n_pos == 0 or n_neg == 0:
                continue
            below = np.cumsum(neg) - neg  # negatives with a lower score than each group
            values.append(float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg)))
        return float(np.mean(values)) if values else float("nan")


def mean_cell_auc(scores: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Mean over markers of the Cell AUC of ``scores`` (n, M) against ``labels`` (n, M) on ``rows`` (all: None)."""
    return CellAUC(scores, labels)(rows)


def compare_runs(
    scores: Mapping[str, np.ndarray],
    labels: np.ndarray,
    tiles: np.ndarray,
    main: str,
    randoms: Sequence[str],
    oracle: str | None = None,
    shuffled: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Mean Cell AUC of every run with its tile-bootstrap 95 % interval, the gate and the verdict.

    ``scores``: run name → (n, M) per-cell scores, rows aligned with ``labels`` (n, M gated labels) and
    ``tiles`` (n,) (the bootstrap blocks). ``main`` is compared with the mean of the ``randoms`` runs; the
    ``oracle`` and ``shuffled`` runs (when given) decide the gate. Returns ``{"runs": {name: {mean_cell_auc,
    ci_low, ci_high}}, "random": ..., "gate": ..., "versus_random": ..., "verdict": str, "text": str}``.
    """
    _, blocks = np.unique(np.asarray(tiles).astype(str), return_inverse=True)
    replicates, runs = {}, {}
    for name, s in scores.items():
        metric = CellAUC(s, labels)
        estimate = metric()
        replicates[name] = block_bootstrap(metric, blocks, n_boot, seed)
        low, high = interval(replicates[name])
        runs[name] = {"mean_cell_auc": estimate, "ci_low": low, "ci_high": high}
    out: dict = {"runs": runs, "n_blocks": int(blocks.max(initial=-1) + 1), "n_boot": int(n_boot), "blocks": "tiles"}
    lines = [f"mean Cell AUC over markers, 95% CI from {out['n_blocks']} test tiles resampled {n_boot}×:"]
    for name, r in runs.items():
        lines.append(f"  {name:<24} {r['mean_cell_auc']:.3f}  [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    if not randoms:
        out["text"] = "\n".join(lines)
        out["verdict"] = None
        return out
    random_mean, random_sd = mean_and_sd({n: runs[n]["mean_cell_auc"] for n in randoms})
    random_reps = np.mean([replicates[n] for n in randoms], axis=0)
    out["random"] = {"seeds": len(randoms), "mean": random_mean, "sd": random_sd, "runs": list(randoms)}
    lines.append(
        f"  random encoders ({len(randoms)} seed{'s' if len(randoms) > 1 else ''}): {random_mean:.3f} ± {random_sd:.3f}"
    )
    passes = True
    if oracle is not None:
        verdict_gate = gate(
            (runs[oracle]["mean_cell_auc"], replicates[oracle]),
            (random_mean, random_reps),
            (runs[shuffled]["mean_cell_auc"], replicates[shuffled]) if shuffled is not None else None,
        )
        out["gate"] = verdict_gate.as_dict()
        lines.append(verdict_gate.describe())
        passes = verdict_gate.passes
    else:
        lines.append("no planted truth (real data): no oracle, so no controls gate; the comparison stands alone")
    diff = difference(runs[main]["mean_cell_auc"] - random_mean, replicates[main], random_reps)
    out["versus_random"] = {**diff.as_dict(), "random_seeds": len(randoms), "shown": passes}
    if passes:
        out["verdict"] = verdict(
            f"{main} (mean Cell AUC)", diff, f"{len(randoms)} random encoder{'s' if len(randoms) > 1 else ''}"
        )
        lines.append(out["verdict"])
        if len(randoms) > 1:
            lines.append(
                f"  (the interval resamples test tiles; the {len(randoms)} random seeds themselves spread "
                f"sd {random_sd:.3f} around their mean, {'under' if random_sd < abs(diff.estimate) else 'OVER'} |Δ|)"
            )
    else:
        out["verdict"] = None
        lines.append(f"{main} vs random encoders: withheld (controls failed)")
    out["text"] = "\n".join(lines)
    return out


__all__ = ["TRUTH_NAME", "CellAUC", "read_planted", "oracle_scores", "shuffled_rows", "mean_cell_auc", "compare_runs"]

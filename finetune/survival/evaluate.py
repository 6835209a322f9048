"""How the survival runs compare: Kaplan–Meier curves and log-rank tests, fold summaries, paired gains.

A test patient is high-risk when their risk exceeds the median risk of that fold's training
patients, so the threshold never sees the test fold and risks from different folds never need a
common scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..report import Column, format_table, save_figure
from .train import MODE_NAMES

# ---------------------------------------------------------------------------------------------
# Kaplan–Meier


def logrank_p(oof: pd.DataFrame) -> float:
    """Log-rank p-value between the high- and low-risk groups (NaN when one group is empty)."""
    from lifelines.statistics import logrank_test

    high, low = oof[oof["high_risk"]], oof[~oof["high_risk"]]
    if len(high) == 0 or len(low) == 0:
        return float("nan")
    result = logrank_test(
        high["survival_months"],
        low["survival_months"],
        event_observed_A=1 - high["censorship"],
        event_observed_B=1 - low["censorship"],
    )
    return float(result.p_value)


def plot_kaplan_meier(oof_by_run: Mapping[str, pd.DataFrame], path: str | Path) -> Path:
    """One panel per run: Kaplan–Meier curves (lifelines) of the high/low-risk groups, log-rank p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    n = len(oof_by_run)
    cols = n if n <= 2 else 2 if n == 4 else min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, oof) in zip(axes.ravel(), oof_by_run.items()):
        for label, group, colour in (
            ("low risk", ~oof["high_risk"], "tab:blue"),
            ("high risk", oof["high_risk"], "tab:red"),
        ):
            part = oof[group]
            if len(part):
                KaplanMeierFitter(label=f"{label} (n={len(part)})").fit(
                    part["survival_months"], 1 - part["censorship"]
                ).plot_survival_function(ax=ax, ci_show=True, color=colour, show_censors=True, censor_styles={"ms": 4})
        p = logrank_p(oof)
        ax.set_title(f"{name}\nlog-rank p = {p:.2g}" if np.isfinite(p) else f"{name}\nlog-rank p = n/a", fontsize=9)
        ax.set_xlabel("months")
        ax.set_ylabel("survival probability")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return save_figure(fig, path, dpi=120)


def summary_table(fold_metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd of Harrell's and Uno's C over folds, per (encoder, mode)."""
    grouped = fold_metrics.groupby(["encoder", "mode"], sort=False)
    table = grouped.agg(
        harrell_mean=("harrell_c", "mean"),
        harrell_sd=("harrell_c", "std"),
        uno_mean=("uno_c", "mean"),
        uno_sd=("uno_c", "std"),
        folds=("fold", "count"),
    ).reset_index()
    return table


# What each richer model adds over a simpler one, compared fold by fold on the same test patients: the
# spread of C over folds mostly reflects how hard each fold is, which a paired difference cancels.
PAIRED_COMPARISONS = (("mcat", "pathology"), ("mcat", "genomic"), ("past_multi", "mcat"))


def paired_gains(fold_metrics: pd.DataFrame) -> pd.DataFrame:
    """Per encoder: Harrell C of `better` minus `base` in each fold, mean ± sd, and the folds it wins."""

    def c_by_fold(encoder: str, mode: str) -> pd.Series:
        owner = "-" if mode == "genomic" else encoder  # genomic-only runs belong to no image encoder
        picked = fold_metrics[(fold_metrics["encoder"] == owner) & (fold_metrics["mode"] == mode)]
        return picked.set_index("fold")["harrell_c"]

    rows = []
    for encoder in [e for e in fold_metrics["encoder"].unique() if e != "-"]:
        for better, base in PAIRED_COMPARISONS:
            a, b = c_by_fold(encoder, better), c_by_fold(encoder, base)
            common = a.index.intersection(b.index)
            if len(common) == 0:
                continue
            diff = (a[common] - b[common]).to_numpy()
            rows.append(
                {
                    "encoder": encoder,
                    "comparison": f"{MODE_NAMES[better]} − {MODE_NAMES[base]}",
                    "mean_gain": float(diff.mean()),
                    "sd_gain": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                    "folds_won": int((diff > 0).sum()),
                    "folds": int(len(diff)),
                }
            )
    return pd.DataFrame(rows, columns=["encoder", "comparison", "mean_gain", "sd_gain", "folds_won", "folds"])


# Reference rows (finetune.survival.reference) beside the trained modes.
DISPLAY_NAMES = {**MODE_NAMES, "ridge_cox": "ridge-Cox"}

SUMMARY_COLUMNS = (
    Column("encoder", 14, "encoder", align="<"),
    Column("mode", 15, lambda r: DISPLAY_NAMES[r["mode"]], align="<"),
    Column("Harrell C", 15, lambda r: f"{r['harrell_mean']:>7.3f} ± {r['harrell_sd']:<5.3f}"),
    Column("Uno C", 15, lambda r: f"{r['uno_mean']:>7.3f} ± {r['uno_sd']:<5.3f}"),
    Column("log-rank p", 11, "logrank_p", ".2g"),
)


def format_summary(summary: pd.DataFrame, p_values: Mapping[tuple[str, str], float]) -> str:
    """The printed table: one line per (encoder, mode), mean ± sd over folds and the log-rank p."""
    rows = [
        {**row, "logrank_p": p_values.get((row["encoder"], row["mode"]), float("nan"))}
        for row in summary.to_dict(orient="records")
    ]
    return format_table(rows, SUMMARY_COLUMNS, sep=" ", missing=None)


__all__ = [
    "DISPLAY_NAMES",
    "logrank_p",
    "plot_kaplan_meier",
    "summary_table",
    "PAIRED_COMPARISONS",
    "paired_gains",
    "format_summary",
]

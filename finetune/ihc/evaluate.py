"""Virtual-IHC evaluation: predictions on whole tiles, per-tile scores, summaries, the table and figures.

Per test tile: PSNR and SSIM (RGB in [0, 1], data range 1), L1, the H-score and the mean nuclear
DAB of predicted and real IHC on the same nuclei (the set's nuclei masks, else ``segment_nuclei``
on the H&E). Across tiles: Pearson / Spearman correlation of the H-scores with the real ones and
their mean absolute error. Two references cost nothing: the H&E itself as the IHC ("identity")
and the mean training IHC colour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage as ndi
from scipy import stats
from skimage.color import rgb2hed
from tqdm.auto import tqdm

from finetune.metrics import h_score, psnr, segment_nuclei, ssim
from finetune.report import Column, save_figure
from finetune.report import format_table as format_text_table

from .data import IHCPair, load_pair, to_model_range, to_uint8
from .model import FiLMUNet


@torch.no_grad()
def predict_ihc(
    generator: FiLMUNet, he_tiles: Sequence[np.ndarray], embeddings: np.ndarray | None, device: torch.device
) -> list[np.ndarray]:
    """uint8 IHC (H, W, 3) per uint8 H&E tile; tiles whose sides are not multiples of the generator's are
    reflect-padded and cropped back. Same-size tiles run as one batch."""
    generator.eval()
    m = generator.multiple_px
    out: list[np.ndarray] = []
    emb = None if embeddings is None or not generator.has_film else torch.as_tensor(embeddings, dtype=torch.float32)
    same = len({t.shape for t in he_tiles}) == 1
    groups = [list(range(len(he_tiles)))] if same else [[i] for i in range(len(he_tiles))]
    for group in groups:
        x = to_model_range(np.stack([he_tiles[i] for i in group])).to(device)  # (B, 3, H, W)
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = torch.nn.functional.pad(
                x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate"
            )
        e = None if emb is None else emb[group].to(device)
        out.extend(to_uint8(generator(x, e)[..., :h, :w]))
    return out


def _as_unit(image_uint8: np.ndarray) -> np.ndarray:
    return image_uint8.astype(np.float64) / 255.0


def nuclear_dab(ihc_rgb: np.ndarray, nuclei: np.ndarray | None) -> float:
    """Mean over nuclei of each nucleus's mean DAB (``rgb2hed`` channel 2): the threshold-free read-out
    behind the H-score, robust to a prediction whose stain is paler than the real one."""
    if nuclei is None:
        return float("nan")
    ids = np.unique(nuclei)
    ids = ids[ids > 0]
    return float(np.mean(ndi.mean(rgb2hed(ihc_rgb)[..., 2], labels=nuclei, index=ids)))


def tile_scores(
    pred: np.ndarray, real: np.ndarray, nuclei: np.ndarray | None, thresholds: Sequence[float]
) -> dict[str, float]:
    """PSNR, SSIM and L1 of one predicted IHC (RGB in [0, 1], data range 1); its H-score and mean nuclear
    DAB on ``nuclei`` (NaN without nuclei)."""
    p, r = _as_unit(pred), _as_unit(real)
    scores = {"psnr": psnr(p, r, 1.0), "ssim": ssim(p, r, 1.0), "l1": float(np.abs(p - r).mean())}
    scores["h_score"] = float(h_score(pred, nuclei, thresholds)["h_score"]) if nuclei is not None else float("nan")
    scores["dab"] = nuclear_dab(pred, nuclei)
    return scores


def tile_nuclei(he: np.ndarray, nuclei: np.ndarray | None, min_area_px: int) -> np.ndarray | None:
    """The nuclei a tile is scored on: its mask when the set has one, else segmented on the H&E; None if none."""
    if nuclei is None:
        nuclei = segment_nuclei(he, min_area_px=min_area_px)
    return nuclei if nuclei.max() > 0 else None


def correlation(x: np.ndarray, y: np.ndarray, kind: str) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    # constant up to rounding (e.g. the mean-colour reference): no defined correlation
    if ok.sum() < 3 or any(np.allclose(v[ok], v[ok][0], rtol=1e-9, atol=0) for v in (x, y)):
        return float("nan")
    return float((stats.pearsonr if kind == "pearson" else stats.spearmanr)(x[ok], y[ok])[0])


def summarise(table: pd.DataFrame, model: str) -> dict[str, float]:
    """Mean PSNR/SSIM/L1 over tiles and the H-score agreement of ``model`` with the real IHC across tiles."""
    pred, real = table[f"h_score_{model}"].to_numpy(float), table["h_score_real"].to_numpy(float)
    ok = np.isfinite(pred) & np.isfinite(real)
    return {
        "psnr_db": float(table[f"psnr_{model}"].mean()),
        "ssim": float(table[f"ssim_{model}"].mean()),
        "l1": float(table[f"l1_{model}"].mean()),
        "h_score_pearson": correlation(pred, real, "pearson"),
        "h_score_spearman": correlation(pred, real, "spearman"),
        "h_score_mae": float(np.abs(pred[ok] - real[ok]).mean()) if ok.any() else float("nan"),
        "dab_pearson": correlation(table[f"dab_{model}"].to_numpy(float), table["dab_real"].to_numpy(float), "pearson"),
        "n_tiles_scored": int(ok.sum()),
    }


def evaluate(
    models: Mapping[str, tuple[FiLMUNet, np.ndarray | None]],
    pairs: Sequence[IHCPair],
    mean_colour: np.ndarray,
    device: torch.device,
    thresholds: Sequence[float],
    min_area_px: int,
    batch_size: int,
    progress: bool,
) -> pd.DataFrame:
    """Per-tile table on the test pairs: for each model (and the references ``identity`` — the H&E as the
    IHC — and ``mean_colour``) PSNR, SSIM, L1 and H-score, beside the real IHC's H-score."""
    rows: list[dict] = []
    for start in tqdm(
        range(0, len(pairs), batch_size), desc="evaluate", unit="batch", disable=not progress, leave=False
    ):
        batch = pairs[start : start + batch_size]
        loaded = [load_pair(p) for p in batch]
        he_tiles = [he for he, _, _ in loaded]
        preds = {
            name: predict_ihc(g, he_tiles, None if e is None else e[start : start + len(batch)], device)
            for name, (g, e) in models.items()
        }
        for i, (pair, (he, ihc, nuclei)) in enumerate(zip(batch, loaded)):
            nuclei = tile_nuclei(he, nuclei, min_area_px)
            row: dict[str, Any] = {
                "name": pair.name,
                "height_px": he.shape[0],
                "width_px": he.shape[1],
                "n_nuclei": 0 if nuclei is None else int(len(np.unique(nuclei)) - 1),
                "h_score_real": float(h_score(ihc, nuclei, thresholds)["h_score"])
                if nuclei is not None
                else float("nan"),
                "dab_real": nuclear_dab(ihc, nuclei),
            }
            references = {"identity": he, "mean_colour": np.broadcast_to(mean_colour, he.shape).astype(np.uint8)}
            for name, pred in [*((n, p[i]) for n, p in preds.items()), *references.items()]:
                row.update({f"{k}_{name}": v for k, v in tile_scores(pred, ihc, nuclei, thresholds).items()})
            rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def mean_l1(
    generator: FiLMUNet, pairs: Sequence[IHCPair], embeddings: np.ndarray | None, device: torch.device
) -> float:
    """Mean absolute error (IHC RGB in [0, 1]) of the generator on full tiles (a fit check on training tiles)."""
    errors = []
    for i, pair in enumerate(pairs):
        he, ihc, _ = load_pair(pair)
        pred = predict_ihc(generator, [he], None if embeddings is None else embeddings[i : i + 1], device)[0]
        errors.append(np.abs(_as_unit(pred) - _as_unit(ihc)).mean())
    return float(np.mean(errors))


# ---------------------------------------------------------------------------------------------
# Outputs


TABLE_COLUMNS = [
    Column("model", 20, "name", align="<"),
    Column("PSNR dB", 9, "psnr_db", ".2f"),
    Column("SSIM", 8, "ssim", ".3f"),
    Column("L1", 8, "l1", ".4f"),
    Column("H-score r", 11, "h_score_pearson", ".3f"),
    Column("rho", 8, "h_score_spearman", ".3f"),
    Column("MAE", 8, "h_score_mae", ".1f"),
    Column("DAB r", 8, "dab_pearson", ".3f"),
]
TABLE_NOTE = (
    "H-score r/rho: Pearson/Spearman of tile H-scores, predicted vs real IHC (same nuclei); MAE in "
    "H-score points (0-300); DAB r: Pearson of the tiles' mean nuclear DAB (threshold-free)"
)


def format_table(results: Mapping[str, Mapping[str, float]], header: str) -> str:
    """The results of every model as aligned text ("–" where a figure is undefined)."""
    return format_text_table(
        [{"name": name, **r} for name, r in results.items()], TABLE_COLUMNS, header=header, footer=TABLE_NOTE
    )


def example_indices(real_h_scores: np.ndarray, n: int) -> list[int]:
    """Tiles spread over the real H-score range (evenly spaced ranks), so the figure shows low to high."""
    order = np.argsort(np.nan_to_num(real_h_scores, nan=-1.0), kind="stable")
    n = min(n, len(order))
    return [int(order[i]) for i in np.linspace(0, len(order) - 1, n).round().astype(int)] if n else []


def plot_examples(
    path: Path,
    names: Sequence[str],
    he: Sequence[np.ndarray],
    preds: Mapping[str, Sequence[np.ndarray]],
    real: Sequence[np.ndarray],
    h_scores: Mapping[str, Sequence[float]],
) -> Path:
    """One row per tile: H&E | each model's predicted IHC | real IHC, H-scores in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["H&E", *preds, "real IHC"]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.6 * len(columns), 2.7 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        images = [he[row], *(p[row] for p in preds.values()), real[row]]
        for col, (title, image) in enumerate(zip(columns, images)):
            ax = axes[row, col]
            ax.imshow(image)
            ax.set_xticks([]), ax.set_yticks([])
            key = "real" if title == "real IHC" else title
            score = h_scores.get(key, [None] * len(names))[row]
            ax.set_title(
                title if score is None or not np.isfinite(score) else f"{title}\nH-score {score:.0f}", fontsize=8
            )
        axes[row, 0].set_ylabel(name, fontsize=7)
    return save_figure(fig, path, dpi=110)


def plot_hscore_scatter(
    path: Path, real: np.ndarray, preds: Mapping[str, np.ndarray], results: Mapping[str, Mapping[str, float]]
) -> Path:
    """Predicted vs real H-score per test tile, one colour per model, with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 300], [0, 300], color="0.6", lw=1, ls="--")
    for name, pred in preds.items():
        r = results[name]["h_score_pearson"]
        ax.scatter(real, pred, s=14, alpha=0.75, label=f"{name} (r = {r:.2f})" if np.isfinite(r) else name)
    ax.set_xlim(-5, 305), ax.set_ylim(-5, 305)
    ax.set_xlabel("H-score, real IHC"), ax.set_ylabel("H-score, predicted IHC")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path, dpi=120)


__all__ = [
    "predict_ihc",
    "nuclear_dab",
    "tile_scores",
    "tile_nuclei",
    "correlation",
    "summarise",
    "evaluate",
    "mean_l1",
    "format_table",
    "example_indices",
    "plot_examples",
    "plot_hscore_scatter",
]

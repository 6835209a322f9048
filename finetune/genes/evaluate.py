"""How well predicted single-cell expression matches the measured one: correlation, clusters, maps.

- :func:`gene_table`: per-gene Pearson r over test cells (``finetune.metrics.pearson_per_gene``).
- :func:`cluster_agreement`: Leiden clusters of the measured and of the predicted expression of the
  same test cells (scanpy: per-gene scaling, PCA, kNN graph, ``tl.leiden``), their adjusted Rand
  index, and label transfer: the measured clusters are the reference labels, each cell's predicted
  profile is projected into the reference PCA space and labelled by its k nearest reference cells
  (what ``scanpy.tl.ingest`` does with ``labeling_method="knn"``); ARI and accuracy of the
  transferred labels against the measured ones.
- :func:`plot_spatial_maps`: a PNG of one gene's measured versus predicted expression at the cells'
  positions (µm).

- :func:`paired_gene_comparison`: gene by gene, is the encoder better than the baseline (Wilcoxon).

Leiden runs on ``igraph`` (a dependency; ``leidenalg`` is used when only it is installed). The kNN
graph uses scanpy's Gaussian kernel (``method="gauss"``) because UMAP's kernel compiles numba code
for a minute on first use.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
from scipy.stats import wilcoxon
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import KNeighborsClassifier

from ..metrics import pearson_per_gene
from ..report import save_figure

log = logging.getLogger(__name__)


def gene_table(genes: Sequence[str], measured: np.ndarray, predictions: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """One row per gene: test-cell mean and sd of the measured log-expression, Pearson r per run."""
    table = pd.DataFrame(
        {"gene": list(genes), "measured_mean": measured.mean(axis=0), "measured_sd": measured.std(axis=0)}
    )
    for name, predicted in predictions.items():
        table[f"pearson_{name}"] = pearson_per_gene(predicted, measured)
    return table


def summarise_pearson(r: np.ndarray, threshold: float = 0.3) -> dict:
    """Mean and median r over genes with a defined correlation, and how many pass ``threshold``."""
    defined = r[~np.isnan(r)]
    if defined.size == 0:
        return {
            "mean_pearson": float("nan"),
            "median_pearson": float("nan"),
            "n_genes_defined": 0,
            f"n_genes_r_above_{threshold}": 0,
        }
    return {
        "mean_pearson": float(defined.mean()),
        "median_pearson": float(np.median(defined)),
        "n_genes_defined": int(defined.size),
        f"n_genes_r_above_{threshold}": int((defined > threshold).sum()),
    }


def leiden_backend() -> str:
    """'igraph' (a dependency) or, where only it is installed, 'leidenalg': what :func:`cluster` will use."""
    if importlib.util.find_spec("igraph") is None and importlib.util.find_spec("leidenalg") is not None:
        return "leidenalg"
    return "igraph"


def _scaled(x: np.ndarray) -> np.ndarray:
    """Per-gene z-scores clipped at ±10; constant genes become 0.

    Not ``sc.pp.scale(max_value=10)``: scanpy divides by the sample sd (ddof=1), which shrinks every
    z-score by √((n−1)/n) and moves the clip, so the clusters and the reported ARIs would change;
    this keeps the population sd (ddof=0), the sd :func:`cluster` reports.
    """
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return np.clip(z, -10.0, 10.0)


def cluster(
    expression: np.ndarray, *, n_pcs: int = 20, n_neighbors: int = 15, resolution: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, str, np.ndarray, np.ndarray]:
    """Leiden clusters of (n_cells, n_genes) expression.

    Returns (labels (n_cells,) int, method, PCA loadings (n_genes, n_pcs), the per-gene (mean, sd)
    used to scale) so other profiles can be projected into the same space.
    """
    n_cells, n_genes = expression.shape
    mean, sd = expression.mean(axis=0), expression.std(axis=0)
    adata = anndata.AnnData(_scaled(expression).astype(np.float32))
    n_comps = int(max(1, min(n_pcs, n_genes - 1, n_cells - 1)))
    sc.pp.pca(adata, n_comps=n_comps, random_state=seed)
    sc.pp.neighbors(
        adata,
        n_neighbors=int(min(n_neighbors, n_cells - 1)),
        use_rep="X_pca",
        method="gauss",
        transformer="sklearn",
        random_state=seed,
    )
    backend = leiden_backend()
    extra = {"n_iterations": 2, "directed": False} if backend == "igraph" else {}
    sc.tl.leiden(adata, resolution=resolution, random_state=seed, flavor=backend, **extra)
    labels = adata.obs["leiden"].astype(int).to_numpy()
    method = f"leiden ({backend})"
    return labels, method, adata.varm["PCs"], np.stack([mean, sd])


def cluster_agreement(
    measured: np.ndarray,
    predicted: np.ndarray,
    *,
    n_pcs: int = 20,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    seed: int = 0,
) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """ARI between the clusters of measured and predicted expression, and of transferred labels.

    Returns (metrics, measured labels, predicted-expression labels, transferred labels), each
    labels array (n_cells,).
    """
    measured_labels, method, loadings, (mean, sd) = cluster(
        measured, n_pcs=n_pcs, n_neighbors=n_neighbors, resolution=resolution, seed=seed
    )
    predicted_labels, _, _, _ = cluster(
        predicted, n_pcs=n_pcs, n_neighbors=n_neighbors, resolution=resolution, seed=seed
    )
    # Label transfer: reference = measured profiles in their PCA space; each predicted profile is
    # scaled on its own (predictions are shrunk towards the mean) and placed in that space.
    reference = _scaled(measured) @ loadings  # (n_cells, n_pcs)
    query = _scaled(predicted) @ loadings
    knn = KNeighborsClassifier(n_neighbors=int(min(n_neighbors, len(reference)))).fit(reference, measured_labels)
    transferred = knn.predict(query)
    metrics = {
        "clustering_method": method,
        "n_clusters_measured": int(len(np.unique(measured_labels))),
        "n_clusters_predicted": int(len(np.unique(predicted_labels))),
        "ari_clusters": float(adjusted_rand_score(measured_labels, predicted_labels)),
        "ari_label_transfer": float(adjusted_rand_score(measured_labels, transferred)),
        "label_transfer_accuracy": float((transferred == measured_labels).mean()),
    }
    return metrics, measured_labels, predicted_labels, transferred


def plot_spatial_maps(
    path: str | Path,
    xy_um: np.ndarray,
    gene: str,
    measured: np.ndarray,
    predicted: Mapping[str, np.ndarray],
    pearson: Mapping[str, float],
    slides: np.ndarray | None = None,
    context_xy_um: np.ndarray | None = None,
    context_slides: np.ndarray | None = None,
    max_slides: int = 3,
) -> Path:
    """PNG: the gene's measured expression and each run's prediction at the test cells (x, y in µm).

    One row per slide (the ``max_slides`` with most test cells; each slide has its own µm frame),
    one column per map. Each panel has its own colour scale (1st–99th percentile): predictions are
    shrunk towards the mean, and the pattern, not the level, is what the eye compares. Training
    cells of the slide (``context_xy_um``) are drawn in light grey for orientation.
    """
    import matplotlib  # lazily: only runs that draw maps pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slides = np.zeros(len(xy_um), dtype=object) if slides is None else np.asarray(slides, dtype=object)
    if context_xy_um is not None and context_slides is None:
        context_slides = np.zeros(len(context_xy_um), dtype=object)
    names, counts = np.unique(slides, return_counts=True)
    shown = list(names[np.argsort(-counts, kind="stable")][:max_slides])
    panels = [("measured", measured, None)] + [(name, values, pearson.get(name)) for name, values in predicted.items()]
    fig, axes = plt.subplots(
        len(shown), len(panels), figsize=(4.2 * len(panels), 4.0 * len(shown) + 0.5), squeeze=False
    )
    for row, slide in enumerate(shown):
        here = slides == slide
        size = float(np.clip(2e4 / max(int(here.sum()), 1), 2, 30))
        for ax, (name, values, r) in zip(axes[row], panels):
            if context_xy_um is not None:
                around = context_xy_um[np.asarray(context_slides, dtype=object) == slide]
                ax.scatter(around[:, 0], around[:, 1], s=size * 0.3, c="0.88", linewidths=0)
            lo, hi = np.percentile(values[here], [1, 99])
            points = ax.scatter(
                xy_um[here, 0],
                xy_um[here, 1],
                c=values[here],
                s=size,
                cmap="viridis",
                vmin=lo,
                vmax=max(hi, lo + 1e-6),
                linewidths=0,
            )
            label = f"{name}" + (f" (r = {r:.2f})" if r is not None and np.isfinite(r) else "")
            ax.set_title(f"{label}\nslide {slide}" if len(shown) > 1 else label, fontsize=10)
            ax.set_aspect("equal")
            ax.invert_yaxis()  # image convention: y grows downwards
            ax.set_xlabel("x (µm)")
            ax.set_ylabel("y (µm)")
            fig.colorbar(points, ax=ax, shrink=0.7, label="log-normalised expression")
    fig.suptitle(f"{gene}: measured vs predicted log-expression of the test cells (r over all test cells)", fontsize=11)
    return save_figure(fig, path, dpi=110)


def paired_gene_comparison(r_ours: np.ndarray, r_base: np.ndarray) -> dict:
    """Gene by gene: how many genes the encoder predicts better than the baseline, and a Wilcoxon signed-rank p.

    The mean r of two runs differs by little when both read colour and nucleus size; the paired test
    says whether the difference is consistent across genes or noise.
    """
    both = ~np.isnan(r_ours) & ~np.isnan(r_base)
    diff = r_ours[both] - r_base[both]
    p = float(wilcoxon(diff).pvalue) if np.count_nonzero(diff) >= 2 else float("nan")
    return {"genes_won": int((diff > 0).sum()), "genes_compared": int(both.sum()), "wilcoxon_p": p}


__all__ = [
    "gene_table",
    "summarise_pearson",
    "leiden_backend",
    "cluster",
    "cluster_agreement",
    "plot_spatial_maps",
    "paired_gene_comparison",
]

"""Single-cell gene-expression prediction from H&E crops (PAST paper, "Single-cell gene expression prediction").

- :mod:`.data`: shard cells joined to their bundles' log-normalised expression; gene selection;
- :mod:`.splits`: intra (held-out blocks), inter (held-out patients), cross (held-out cancer types);
- :mod:`.model`: the ridge probe on frozen features and end-to-end fine-tuning;
- :mod:`.evaluate`: Pearson r per gene, Leiden cluster agreement, spatial maps, paired comparison;
- :mod:`.config` / :mod:`.run`: ``launch/finetune.py genes`` (:class:`GenesConfig`, :func:`run_genes`).
"""

from .config import GenesConfig
from .data import CellData, load_cell_data, log_normalise, resolve_bundle, select_genes
from .evaluate import (
    cluster,
    cluster_agreement,
    gene_table,
    paired_gene_comparison,
    plot_spatial_maps,
    summarise_pearson,
)
from .model import LinearHead, finetune_end_to_end, fit_linear_probe
from .run import MODES, format_results, run_genes
from .splits import SETTINGS, Split, split_cells

__all__ = [
    "MODES",
    "SETTINGS",
    "CellData",
    "GenesConfig",
    "LinearHead",
    "Split",
    "cluster",
    "cluster_agreement",
    "finetune_end_to_end",
    "fit_linear_probe",
    "format_results",
    "gene_table",
    "load_cell_data",
    "log_normalise",
    "paired_gene_comparison",
    "plot_spatial_maps",
    "resolve_bundle",
    "run_genes",
    "select_genes",
    "split_cells",
    "summarise_pearson",
]

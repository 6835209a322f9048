"""Gene panel and per-cell expression of synthetic bundles.

The panel mixes real marker genes (HGNC symbol + Ensembl gene id) with neutral background
genes named ``SYNG0001``… whose ids ``ENSG9…`` are SYNTHETIC: they start with 9, which no real
Ensembl human gene id does, so they can never be mistaken for a real gene (a vocabulary lookup
simply misses them). Negative-control probes and codewords follow Xenium's naming.

Counts follow a Poisson-Gamma (negative binomial) model: cell i of type τ gets
``Poisson(L_i · p_τg · exp(β_g·z_i) · Γ_ig)`` with library size ``L_i`` proportional to cell area,
``z_i`` standardized image covariates (nucleus stain, nucleus area, eosin context) so image and
expression share signal, and ``Γ_ig ~ Gamma(k, 1/k)`` per-cell-gene over-dispersion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .cell_types import CELL_TYPES

log = logging.getLogger(__name__)

# Real marker genes: symbol -> Ensembl gene id (GRCh38). Ids checked against public annotations.
MARKER_GENES: dict[str, str] = {
    "KRT5": "ENSG00000186081",
    "KRT14": "ENSG00000186847",
    "KRT15": "ENSG00000171346",
    "KRT17": "ENSG00000128422",
    "KRT6A": "ENSG00000205420",
    "TP63": "ENSG00000073282",
    "KRT1": "ENSG00000167768",
    "KRT10": "ENSG00000186395",
    "LOR": "ENSG00000203782",
    "IVL": "ENSG00000163207",
    "FLG": "ENSG00000143631",
    "DSP": "ENSG00000096696",
    "SFN": "ENSG00000175793",
    "CDH1": "ENSG00000039068",
    "EPCAM": "ENSG00000119888",
    "MKI67": "ENSG00000148773",
    "TOP2A": "ENSG00000131747",
    "PCNA": "ENSG00000132646",
    "COL1A1": "ENSG00000108821",
    "COL1A2": "ENSG00000164692",
    "COL3A1": "ENSG00000168542",
    "DCN": "ENSG00000011465",
    "LUM": "ENSG00000139329",
    "PDGFRA": "ENSG00000134853",
    "PDGFRB": "ENSG00000113721",
    "FAP": "ENSG00000078098",
    "POSTN": "ENSG00000133110",
    "FN1": "ENSG00000115414",
    "SPARC": "ENSG00000113140",
    "VIM": "ENSG00000026025",
    "PTPRC": "ENSG00000081237",
    "CD3E": "ENSG00000198851",
    "CD3D": "ENSG00000167286",
    "CD2": "ENSG00000116824",
    "CD8A": "ENSG00000153563",
    "CD4": "ENSG00000010610",
    "CD19": "ENSG00000177455",
    "MS4A1": "ENSG00000156738",
    "CD68": "ENSG00000129226",
    "CD14": "ENSG00000170458",
    "CD163": "ENSG00000177575",
    "LYZ": "ENSG00000090382",
    "NKG7": "ENSG00000105374",
    "CD74": "ENSG00000019582",
    "PECAM1": "ENSG00000261371",
    "VWF": "ENSG00000110799",
    "CDH5": "ENSG00000179776",
    "CD34": "ENSG00000174059",
    "KDR": "ENSG00000128052",
    "ENG": "ENSG00000106991",
    "ACTA2": "ENSG00000107796",
    "TAGLN": "ENSG00000149591",
    "MYH11": "ENSG00000133392",
    "RGS5": "ENSG00000143248",
    "GAPDH": "ENSG00000111640",
    "ACTB": "ENSG00000075624",
}

# Per-type programs: marker -> fold over the neutral background.
TYPE_PROGRAMS: dict[str, dict[str, float]] = {
    "keratinocyte_basal": {
        "KRT5": 60,
        "KRT14": 60,
        "KRT15": 25,
        "TP63": 20,
        "KRT17": 10,
        "KRT6A": 8,
        "DSP": 15,
        "SFN": 15,
        "CDH1": 12,
        "EPCAM": 4,
        "MKI67": 6,
        "TOP2A": 6,
        "PCNA": 8,
    },
    "keratinocyte_suprabasal": {
        "KRT1": 70,
        "KRT10": 70,
        "LOR": 20,
        "IVL": 20,
        "FLG": 15,
        "DSP": 20,
        "SFN": 20,
        "CDH1": 10,
        "KRT5": 8,
        "KRT14": 8,
    },
    "fibroblast": {
        "COL1A1": 60,
        "COL1A2": 55,
        "COL3A1": 45,
        "DCN": 40,
        "LUM": 35,
        "PDGFRA": 12,
        "PDGFRB": 8,
        "FAP": 6,
        "POSTN": 10,
        "FN1": 15,
        "SPARC": 20,
        "VIM": 25,
    },
    "immune": {
        "PTPRC": 50,
        "CD3E": 25,
        "CD3D": 20,
        "CD2": 15,
        "CD8A": 8,
        "CD4": 8,
        "CD19": 4,
        "MS4A1": 4,
        "CD68": 15,
        "CD14": 8,
        "CD163": 6,
        "LYZ": 12,
        "NKG7": 6,
        "CD74": 30,
        "VIM": 10,
    },
    "endothelial": {
        "PECAM1": 50,
        "VWF": 50,
        "CDH5": 30,
        "CD34": 25,
        "KDR": 15,
        "ENG": 20,
        "ACTA2": 20,
        "TAGLN": 15,
        "MYH11": 8,
        "RGS5": 12,
        "VIM": 20,
        "SPARC": 10,
    },
}

# Image-tied continuous modulation: marker -> (covariate, log-fold per standard deviation).
IMAGE_LOADINGS: dict[str, tuple[str, float]] = {
    "MKI67": ("hematoxylin", 0.8),
    "TOP2A": ("hematoxylin", 0.8),
    "PCNA": ("hematoxylin", 0.5),
    "KRT1": ("nucleus_area", -0.5),
    "KRT10": ("nucleus_area", -0.5),
    "LOR": ("context_eosin", 0.4),
    "COL1A1": ("context_eosin", 0.6),
    "COL3A1": ("context_eosin", 0.6),
    "DCN": ("context_eosin", 0.4),
    "CD74": ("nucleus_area", 0.4),
    "CD68": ("nucleus_area", 0.6),
    "CD3E": ("nucleus_area", -0.6),
}
COVARIATES = ("hematoxylin", "nucleus_area", "context_eosin")

N_NEG_CONTROL_PROBES = 20
N_NEG_CONTROL_CODEWORDS = 41
N_UNASSIGNED_CODEWORDS = 20

FEATURE_TYPES = {
    "gene": "Gene Expression",
    "probe": "Negative Control Probe",
    "codeword": "Negative Control Codeword",
    "unassigned": "Unassigned Codeword",
}
CODEWORD_CATEGORY = {
    "gene": "predesigned_gene",
    "probe": "negative_control_probe",
    "codeword": "negative_control_codeword",
    "unassigned": "unassigned_codeword",
}


@dataclass
class Panel:
    names: np.ndarray  # (F,) str feature names, genes first
    ids: np.ndarray  # (F,) str feature ids
    kinds: np.ndarray  # (F,) str, one of FEATURE_TYPES' keys
    codeword_index: np.ndarray  # (F,) int32

    @property
    def n_genes(self) -> int:
        return int(np.sum(self.kinds == "gene"))

    @property
    def feature_types(self) -> np.ndarray:
        return np.array([FEATURE_TYPES[k] for k in self.kinds])

    @property
    def codeword_categories(self) -> np.ndarray:
        return np.array([CODEWORD_CATEGORY[k] for k in self.kinds])


def make_panel(n_genes: int = 300, seed: int = 0) -> Panel:
    """All markers plus ``n_genes - len(markers)`` synthetic background genes, then control features."""
    markers = list(MARKER_GENES)
    n_background = max(0, n_genes - len(markers))
    names = markers + [f"SYNG{i:04d}" for i in range(1, n_background + 1)]
    ids = [MARKER_GENES[g] for g in markers] + [f"ENSG9{i:010d}" for i in range(1, n_background + 1)]
    kinds = ["gene"] * len(names)
    for prefix, count, kind in (
        ("NegControlProbe", N_NEG_CONTROL_PROBES, "probe"),
        ("NegControlCodeword", N_NEG_CONTROL_CODEWORDS, "codeword"),
        ("UnassignedCodeword", N_UNASSIGNED_CODEWORDS, "unassigned"),
    ):
        for i in range(count):
            label = f"{prefix}_{i:05d}" if kind == "probe" else f"{prefix}_{i:04d}"
            names.append(label)
            ids.append(label)
            kinds.append(kind)
    rng = np.random.default_rng(seed + 7919)
    codeword_index = rng.permutation(np.arange(len(names), dtype=np.int32) * 3 + 1).astype(np.int32)
    return Panel(np.array(names), np.array(ids), np.array(kinds), codeword_index)


def type_profiles(panel: Panel, rng: np.random.Generator) -> np.ndarray:
    """(n_types, n_genes) expected fraction of a cell's gene transcripts per type (rows sum to 1)."""
    n_genes = panel.n_genes
    background = rng.lognormal(mean=0.0, sigma=1.0, size=n_genes)  # shared neutral expression
    gene_index = {name: i for i, name in enumerate(panel.names[:n_genes])}
    profiles = np.tile(background, (len(CELL_TYPES), 1))
    for t, cell_type in enumerate(CELL_TYPES):
        for gene, fold in TYPE_PROGRAMS[cell_type].items():
            profiles[t, gene_index[gene]] *= fold
        for housekeeping in ("GAPDH", "ACTB"):
            profiles[t, gene_index[housekeeping]] *= 20
    return profiles / profiles.sum(axis=1, keepdims=True)


def _loadings(panel: Panel) -> np.ndarray:
    """(n_covariates, n_genes) log-fold per standard deviation of each covariate."""
    gene_index = {name: i for i, name in enumerate(panel.names[: panel.n_genes])}
    beta = np.zeros((len(COVARIATES), panel.n_genes))
    for gene, (covariate, weight) in IMAGE_LOADINGS.items():
        beta[COVARIATES.index(covariate), gene_index[gene]] = weight
    return beta


def standardize(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    sd = values.std()
    return (values - values.mean()) / (sd if sd > 0 else 1.0)


def sample_counts(
    panel: Panel,
    cell_type_index: np.ndarray,
    cell_area_um2: np.ndarray,
    covariates: np.ndarray,
    rng: np.random.Generator,
    mean_transcripts_per_cell: float = 180.0,
    dispersion_shape: float = 2.0,
    control_rate: float = 0.003,
    chunk_cells: int = 20000,
) -> sp.csr_matrix:
    """(n_cells, n_features) int32 counts of every panel feature (genes then controls).

    ``covariates``: (n_cells, len(COVARIATES)) standardized image covariates.
    ``control_rate``: expected control-feature counts per control feature, per 100 gene counts.
    """
    n_cells = len(cell_type_index)
    profiles = type_profiles(panel, rng)
    beta = _loadings(panel)
    library = mean_transcripts_per_cell * cell_area_um2 / max(float(np.mean(cell_area_um2)), 1e-9)
    n_controls = len(panel.names) - panel.n_genes
    blocks = []
    for start in range(0, n_cells, chunk_cells):
        stop = min(start + chunk_cells, n_cells)
        p = profiles[cell_type_index[start:stop]] * np.exp(covariates[start:stop] @ beta)  # (chunk, G)
        p /= p.sum(axis=1, keepdims=True)
        rate = p * library[start:stop, None]
        rate *= rng.gamma(dispersion_shape, 1.0 / dispersion_shape, size=rate.shape)
        genes = rng.poisson(rate).astype(np.int32)
        control_mean = control_rate * library[start:stop, None] / 100.0
        controls = rng.poisson(np.broadcast_to(control_mean, (stop - start, n_controls))).astype(np.int32)
        blocks.append(sp.csr_matrix(np.concatenate([genes, controls], axis=1)))
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(panel.names)), dtype=np.int32)

"""Rank-value tokenization of cell expression (PAST paper, after Nicheformer).

For each cell, the value of gene g is ``count_g / cell_total × 10,000 / tech_mean_g``; the
non-zero genes are ranked by descending value and written as vocabulary token ids after three
context tokens, then padded:

    row (context_length,) = [assay, modality, organism, gene ids by descending value..., PAD...]

Conventions (decisions the rest of the project relies on):

* The cell total sums the genes found in the vocabulary only. Nicheformer aligns each dataset to
  its ``model.h5ad`` gene order (an inner join, dropping other genes) before normalising to
  10,000 counts. Within one cell the total and the 10,000 are the same positive factor for every
  gene, so they never change the ranking; they only change ``compute_tech_mean``.
* Ranking uses ``count / mean`` computed as ONE float64 division. Equal real values give equal
  floats, so genuine ties stay ties (a chain of operations could split them at random); values
  that round to the same float64 (e.g. 1/6.05 and 3/18.15) are tied as well.
* Ties are broken by vocabulary id ascending (a sort on ``(-value, token_id)``).
* A technology mean that is NaN (gene never measured by that technology) or 0 counts as 1, as in
  Nicheformer. Nicheformer's notebooks also rounded the means to integers; we do not.
* The context tokens come in DESIGN.md's order [assay, modality, organism]. Nicheformer's
  model prepends them as [organism, assay, modality]; a row can be reordered for a Nicheformer
  checkpoint with ``row[[2, 0, 1]]`` on the first three columns.
* Genes outside the vocabulary are excluded, counted, and reported (``TokenizationReport``);
  several AnnData genes that map to one vocabulary gene are summed into it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from common.atomic import atomic_path
from common.errors import InputError

from .vocabulary import (  # re-exported: the contract names them in this module
    ASSAY_TOKENS,
    CLS,
    GENE_OFFSET,
    MASK,
    MODALITY_TOKENS,
    ORGANISM_TOKENS,
    PAD,
    Vocabulary,
    context_token,
)

__all__ = [
    "ASSAY_TOKENS",
    "CLS",
    "GENE_OFFSET",
    "MASK",
    "MODALITY_TOKENS",
    "ORGANISM_TOKENS",
    "PAD",
    "TokenizationReport",
    "Vocabulary",
    "compute_tech_mean",
    "context_token",
    "effective_mean",
    "load_tech_mean",
    "rank_tokens",
    "rank_tokens_with_report",
    "save_tech_mean",
]

log = logging.getLogger(__name__)

TARGET_SUM = 10_000.0  # counts per cell after size normalisation
N_CONTEXT_TOKENS = 3
_DEFAULT_CHUNK_ROWS = 65_536
# Largest (max count × panel genes) for which ranks come from a precomputed value table.
_RANK_TABLE_LIMIT = 1 << 24


@dataclasses.dataclass
class TokenizationReport:
    """What happened to the AnnData's genes and cells during tokenization."""

    n_cells: int
    n_genes: int  # genes in the AnnData
    n_genes_matched: int
    n_matched_by_id: int
    n_matched_by_symbol: int
    unmatched_genes: list[str]  # AnnData var names not in the vocabulary (excluded from ranking)
    merged_genes: list[str]  # AnnData var names summed into a vocabulary gene another var also maps to
    n_cells_without_counts: int  # cells with no count on any vocabulary gene: context tokens + padding
    n_cells_truncated: int  # cells with more non-zero genes than fit in the context
    vocab_source: str | None
    vocab_sha256: str

    @property
    def n_genes_unmatched(self) -> int:
        return len(self.unmatched_genes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["n_genes_unmatched"] = self.n_genes_unmatched
        return out


# ---------------------------------------------------------------------------- public API
def rank_tokens(
    adata,
    vocab: Vocabulary | str | Path,
    tech_mean: np.ndarray | str | Path | None = None,
    context_length: int = 300,
    assay: str | int = "xenium",
    modality: str | int = "spatial",
    organism: str | int = "human",
) -> np.ndarray:
    """Token ids, int32 (n_cells, context_length): [assay, modality, organism, genes..., PAD...].

    ``vocab``: a Vocabulary or a path to one (gene list or Nicheformer ``model.h5ad``).
    ``tech_mean``: per-vocabulary-gene mean (array or ``.npy`` path); None ranks by normalised
    count alone. Logs a warning naming genes outside the vocabulary.
    """
    tokens, _ = rank_tokens_with_report(adata, vocab, tech_mean, context_length, assay, modality, organism)
    return tokens


def rank_tokens_with_report(
    adata,
    vocab: Vocabulary | str | Path,
    tech_mean: np.ndarray | str | Path | None = None,
    context_length: int = 300,
    assay: str | int = "xenium",
    modality: str | int = "spatial",
    organism: str | int = "human",
    chunk_rows: int = _DEFAULT_CHUNK_ROWS,
) -> tuple[np.ndarray, TokenizationReport]:
    """``rank_tokens`` plus a ``TokenizationReport``; processes ``chunk_rows`` cells at a time."""
    if int(context_length) < N_CONTEXT_TOKENS:
        raise InputError(
            None, "context_length", f"at least {N_CONTEXT_TOKENS} (assay, modality, organism tokens)", context_length
        )
    context_length = int(context_length)
    context = np.array(
        [context_token("assay", assay), context_token("modality", modality), context_token("organism", organism)],
        dtype=np.int32,
    )
    vocab = _as_vocabulary(vocab)
    mean = effective_mean(load_tech_mean(tech_mean, vocab)) if tech_mean is not None else np.ones(len(vocab))
    columns = _match_columns(adata, vocab)

    n_cells = adata.n_obs
    tokens = np.full((n_cells, context_length), PAD, dtype=np.int32)
    tokens[:, :N_CONTEXT_TOKENS] = context
    n_gene_slots = context_length - N_CONTEXT_TOKENS
    gene_tokens = (columns.vocab_positions + GENE_OFFSET).astype(np.int32)  # (n_panel_genes,)
    panel_mean = mean[columns.vocab_positions]  # (n_panel_genes,)
    n_empty = n_truncated = 0

    for start in _progress(range(0, n_cells, chunk_rows), n_cells, chunk_rows, "rank tokens"):
        chunk = _panel_chunk(adata, columns, start, min(start + chunk_rows, n_cells))
        nnz_per_cell = np.diff(chunk.indptr)  # (chunk_cells,)
        n_empty += int(np.count_nonzero(nnz_per_cell == 0))
        n_truncated += int(np.count_nonzero(nnz_per_cell > n_gene_slots))
        if chunk.nnz == 0 or n_gene_slots == 0:
            continue
        cell, slot, panel_gene = _ranked_entries(chunk, panel_mean)
        keep = slot < n_gene_slots
        tokens[start + cell[keep], N_CONTEXT_TOKENS + slot[keep]] = gene_tokens[panel_gene[keep]]

    report = TokenizationReport(
        n_cells=n_cells,
        n_genes=adata.n_vars,
        n_genes_matched=columns.n_matched,
        n_matched_by_id=columns.n_by_id,
        n_matched_by_symbol=columns.n_matched - columns.n_by_id,
        unmatched_genes=columns.unmatched,
        merged_genes=columns.merged,
        n_cells_without_counts=n_empty,
        n_cells_truncated=n_truncated,
        vocab_source=vocab.source,
        vocab_sha256=vocab.sha256(),
    )
    _log_report(report)
    return tokens, report


def load_tech_mean(path_or_array: np.ndarray | str | Path, vocab: Vocabulary | str | Path) -> np.ndarray:
    """Per-gene technology mean aligned to ``vocab``: float64 (len(vocab),), NaN kept as NaN."""
    vocab = _as_vocabulary(vocab)
    source = None
    if isinstance(path_or_array, (str, Path)):
        source = Path(path_or_array)
        if not source.is_file():
            raise InputError(source, None, "an existing .npy file of per-gene technology means", "no such file")
        try:
            array = np.load(source, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(source, None, "a NumPy .npy array", f"{type(exc).__name__}: {exc}") from exc
    else:
        array = path_or_array
    array = np.asarray(array)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
        raise InputError(
            source, "tech_mean", "a 1-D numeric array (one mean per vocabulary gene)", f"{array.dtype} {array.shape}"
        )
    if array.shape[0] != len(vocab):
        raise InputError(
            source,
            "tech_mean",
            f"{len(vocab)} values, one per gene of the vocabulary {vocab.source or ''}".rstrip(),
            f"{array.shape[0]} values",
        )
    array = array.astype(np.float64)
    if np.any(array[np.isfinite(array)] < 0) or np.any(np.isinf(array)):
        raise InputError(
            source,
            "tech_mean",
            "non-negative finite means (NaN for unmeasured genes)",
            f"min {np.nanmin(array)}, max {np.nanmax(array)}",
        )
    return array


def effective_mean(tech_mean: np.ndarray) -> np.ndarray:
    """The divisor actually used: NaN (never measured) or 0 becomes 1, as in Nicheformer."""
    tech_mean = np.asarray(tech_mean, dtype=np.float64)
    return np.where(np.isfinite(tech_mean) & (tech_mean > 0), tech_mean, 1.0)


def compute_tech_mean(adata, vocab: Vocabulary | str | Path, chunk_rows: int = _DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """Technology mean from training cells: float64 (len(vocab),).

    For each vocabulary gene, the mean of ``count / cell_total × 10,000`` over the cells where
    that gene is non-zero (Nicheformer's "technology-specific non-zero mean"; the cell total sums
    vocabulary genes only). NaN for genes that are not measured or never detected. ``adata`` may be
    one AnnData or an iterable of them (e.g. a generator reading the slides of one technology one
    at a time); all their cells are pooled, so a gene's mean weighs each slide by its non-zero cells.
    """
    vocab = _as_vocabulary(vocab)
    datasets = [adata] if hasattr(adata, "n_obs") else adata  # iterated once, lazily
    value_sum = np.zeros(len(vocab))  # Σ normalised expression over non-zero cells, per gene
    n_nonzero = np.zeros(len(vocab), dtype=np.int64)
    for data in datasets:
        columns = _match_columns(data, vocab)
        for start in _progress(range(0, data.n_obs, chunk_rows), data.n_obs, chunk_rows, "technology mean"):
            chunk = _panel_chunk(data, columns, start, min(start + chunk_rows, data.n_obs))
            cell_total = np.asarray(chunk.sum(axis=1)).ravel()  # (chunk_cells,) counts
            cell = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
            normalised = chunk.data / cell_total[cell] * TARGET_SUM
            position = columns.vocab_positions[chunk.indices]
            value_sum += np.bincount(position, weights=normalised, minlength=len(vocab))
            n_nonzero += np.bincount(position, minlength=len(vocab))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_nonzero > 0, value_sum / np.maximum(n_nonzero, 1), np.nan)


def save_tech_mean(path: str | Path, tech_mean: np.ndarray) -> Path:
    """Write the means as a float64 ``.npy`` file, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # A file handle, because np.save would append ".npy" to the temporary name.
        np.save(handle, np.asarray(tech_mean, dtype=np.float64), allow_pickle=False)
    return path


# ---------------------------------------------------------------------------- internals
@dataclasses.dataclass
class _Columns:
    """How the AnnData's var columns map onto the panel: the vocabulary genes it measures."""

    var_to_panel: np.ndarray  # (n_vars,) int64, panel index or -1 for genes outside the vocabulary
    vocab_positions: np.ndarray  # (n_panel_genes,) int64, ascending vocabulary positions
    n_matched: int
    n_by_id: int
    unmatched: list[str]
    merged: list[str]
    source: str

    @property
    def has_merges(self) -> bool:
        return bool(self.merged)


def _as_vocabulary(vocab: Vocabulary | str | Path) -> Vocabulary:
    return vocab if isinstance(vocab, Vocabulary) else Vocabulary.from_file(vocab)


def _match_columns(adata, vocab: Vocabulary) -> _Columns:
    names = adata.var_names.astype(str).tolist()
    id_column = next((c for c in ("gene_ids", "gene_id") if c in adata.var.columns), None)
    gene_ids = adata.var[id_column].tolist() if id_column else [None] * len(names)
    positions, by_id = vocab.match(gene_ids, names)
    matched = positions >= 0
    if not matched.any():
        raise InputError(
            vocab.source,
            "genes",
            f"at least one of the AnnData's {len(names)} genes in this {len(vocab)}-gene vocabulary "
            "(matched by Ensembl id in var['gene_ids'], then by symbol)",
            f"none, e.g. {names[:5]}",
        )
    # Panel index increases with vocabulary position, so ordering by panel index breaks ties by token id.
    vocab_positions, var_to_panel_matched = np.unique(positions[matched], return_inverse=True)
    var_to_panel = np.full(len(names), -1, dtype=np.int64)
    var_to_panel[matched] = var_to_panel_matched
    first_var = {}
    merged = []
    for j in np.flatnonzero(matched):
        if positions[j] in first_var:
            merged.append(names[j])
        else:
            first_var[positions[j]] = j
    return _Columns(
        var_to_panel=var_to_panel,
        vocab_positions=vocab_positions.astype(np.int64),
        n_matched=int(matched.sum()),
        n_by_id=int(by_id.sum()),
        unmatched=[names[j] for j in np.flatnonzero(~matched)],
        merged=merged,
        source=str(getattr(adata, "filename", None) or "AnnData"),
    )


def _panel_chunk(adata, columns: _Columns, start: int, stop: int) -> sp.csr_matrix:
    """Cells [start, stop) as float64 CSR (chunk_cells, n_panel_genes) of their positive counts."""
    block = adata.X[start:stop]
    block = block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
    data = np.asarray(block.data, dtype=np.float64)
    if data.size and (not np.all(np.isfinite(data)) or data.min() < 0):
        bad = data[~np.isfinite(data) | (data < 0)][0]
        raise InputError(columns.source, f"X rows {start}-{stop - 1}", "non-negative finite counts", bad)
    panel = columns.var_to_panel[block.indices]
    keep = (panel >= 0) & (data > 0)
    n_rows = stop - start
    if not columns.has_merges and keep.all():  # common case: every stored entry is a positive panel count
        return sp.csr_matrix((data, panel, block.indptr), shape=(n_rows, len(columns.vocab_positions)))
    cell = np.repeat(np.arange(n_rows), np.diff(block.indptr))[keep]
    if columns.has_merges:
        # COO -> CSR sums the entries of var genes that share a vocabulary gene.
        out = sp.coo_matrix((data[keep], (cell, panel[keep])), shape=(n_rows, len(columns.vocab_positions))).tocsr()
        out.eliminate_zeros()
        return out
    indptr = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=n_rows))])
    return sp.csr_matrix((data[keep], panel[keep], indptr), shape=(n_rows, len(columns.vocab_positions)))


def _ranked_entries(chunk: sp.csr_matrix, panel_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every non-zero entry as (cell, slot, panel gene), slot 0 = highest value in its cell.

    One argsort over a composite int64 key (cell, value rank descending, panel gene): all keys
    are distinct, so the order is fully determined and ties fall to the lower token id.
    """
    n_rows, n_panel = chunk.shape
    cell = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(chunk.indptr))  # (nnz,)
    gene = chunk.indices.astype(np.int64)  # (nnz,)
    value_rank, n_ranks = _descending_value_rank(chunk.data, gene, panel_mean)
    if n_rows * n_ranks * n_panel < 2**62:
        # Keys are distinct, so any sort gives the same order; timsort ('stable') is the fastest here
        # because the keys already ascend cell by cell.
        order = np.argsort((cell * n_ranks + value_rank) * n_panel + gene, kind="stable")
    else:  # a composite key would overflow int64
        order = np.lexsort((gene, value_rank, cell))
    cell, gene = cell[order], gene[order]
    first_entry_of_cell = chunk.indptr[:-1].astype(np.int64)  # entries are grouped by cell after sorting too
    slot = np.arange(cell.size, dtype=np.int64) - first_entry_of_cell[cell]
    return cell, slot, gene


def _descending_value_rank(counts: np.ndarray, gene: np.ndarray, panel_mean: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense rank of ``count / mean`` (0 = largest; equal values share a rank), and the number of ranks."""
    max_count = counts.max()
    is_integer = np.all(counts == np.floor(counts))
    if is_integer and max_count * panel_mean.size <= _RANK_TABLE_LIMIT:
        # Counts are small integers: rank every possible (count, gene) value once, then look up.
        # Much faster than sorting the floats of every entry; the values are computed identically.
        all_values = np.arange(1, max_count + 1)[:, None] / panel_mean[None, :]  # (max_count, n_panel)
        distinct, rank_table = np.unique(-all_values.ravel(), return_inverse=True)
        rank_table = rank_table.reshape(all_values.shape)
        return rank_table[counts.astype(np.int64) - 1, gene], distinct.size
    distinct, rank = np.unique(-(counts / panel_mean[gene]), return_inverse=True)
    return rank.astype(np.int64), distinct.size


def _progress(chunk_starts: range, n_cells: int, chunk_rows: int, label: str):
    """tqdm over chunks, shown on rank 0 only and only when there is more than one chunk."""
    quiet = os.environ.get("RANK", "0") != "0" or n_cells <= chunk_rows
    return tqdm(chunk_starts, desc=label, unit="chunk", disable=quiet)


def _log_report(report: TokenizationReport) -> None:
    if report.unmatched_genes:
        log.warning(
            "%d of %d genes are not in the vocabulary %s and are left out of the ranking, e.g. %s",
            report.n_genes_unmatched,
            report.n_genes,
            report.vocab_source or "",
            report.unmatched_genes[:10],
        )
    if report.merged_genes:
        log.warning(
            "%d genes share a vocabulary entry with another gene and are summed into it, e.g. %s",
            len(report.merged_genes),
            report.merged_genes[:10],
        )
    if report.n_cells_without_counts:
        log.info(
            "%d of %d cells have no counts on vocabulary genes (context tokens and padding only)",
            report.n_cells_without_counts,
            report.n_cells,
        )

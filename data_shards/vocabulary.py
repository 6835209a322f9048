"""Gene vocabulary and reserved token ids, following Nicheformer's scheme.

Token ids (Nicheformer, ``theislab/nicheformer``; see ``../shared/fixtures/README.md``):

====  =========================================================================
0     mask
1     pad
2     cls
3–4   modality: 3 dissociated, 4 spatial
5–6   organism: 5 human, 6 mouse
7–18  assay: 7 merfish, 8 cosmx, 9 xenium, 10 10x 5' v2, 11 10x 3' v3,
      12 10x 3' v2, 13 10x 5' v1, 14 10x 3' v1, 15 10x 3' transcription profiling
      (alias "10x transcription profiling"), 16 10x 5' transcription profiling,
      17 CITE-seq, 18 Smart-seq v4
19–29 reserved, unused
30+i  gene i of the vocabulary
====  =========================================================================

Genes are matched by Ensembl id first (a version suffix such as ``.5`` is ignored), then by
exact, case-sensitive symbol. There is deliberately no case-insensitive fallback: Nicheformer's
vocabulary mixes human (``ACTA2``) and mouse (``Acta2``) genes, whose symbols differ only by case,
so case folding would silently map a gene to the other species.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from common.atomic import atomic_path
from common.errors import InputError

log = logging.getLogger(__name__)

MASK = 0
PAD = 1
CLS = 2
MODALITY_TOKENS: dict[str, int] = {"dissociated": 3, "spatial": 4}
ORGANISM_TOKENS: dict[str, int] = {"human": 5, "mouse": 6}
ASSAY_TOKENS: dict[str, int] = {
    "merfish": 7,
    "cosmx": 8,
    "xenium": 9,
    "10x 5' v2": 10,
    "10x 3' v3": 11,
    "10x 3' v2": 12,
    "10x 5' v1": 13,
    "10x 3' v1": 14,
    "10x 3' transcription profiling": 15,
    "10x 5' transcription profiling": 16,
    "cite-seq": 17,
    "smart-seq v4": 18,
}
GENE_OFFSET = 30

# Other spellings Nicheformer's notebooks use for the same tokens.
_ALIASES: dict[str, str] = {
    "homo sapiens": "human",
    "mus musculus": "mouse",
    "nanostring digital spatial profiling": "cosmx",
    "10x transcription profiling": "10x 3' transcription profiling",
}

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d+(\.\d+)?$")
_HEADER_ID = {"gene_id", "gene_ids", "ensembl_id", "id"}
_HEADER_SYMBOL = {"gene_symbol", "gene_symbols", "symbol", "gene_name", "feature_name", "name"}
# var columns of an .h5ad vocabulary that may hold symbols, most specific first.
_H5AD_SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "feature_name", "gene_name", "symbol")


def context_token(kind: str, name: str | int) -> int:
    """Id of an assay / modality / organism token, by name (case-insensitive) or as an id."""
    table = {"assay": ASSAY_TOKENS, "modality": MODALITY_TOKENS, "organism": ORGANISM_TOKENS}[kind]
    if isinstance(name, (int, np.integer)):
        if int(name) not in table.values():
            raise InputError(None, kind, f"one of the token ids {sorted(table.values())}", name)
        return int(name)
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in table:
        raise InputError(None, kind, f"one of {sorted(table)}", repr(name))
    return table[key]


def is_ensembl_id(name: str) -> bool:
    return bool(_ENSEMBL.match(name))


def strip_version(gene_id: str) -> str:
    """``ENSG00000121270.5`` -> ``ENSG00000121270``; other names unchanged."""
    if is_ensembl_id(gene_id) and "." in gene_id:
        return gene_id.split(".", 1)[0]
    return gene_id


class Vocabulary:
    """Ordered gene list; gene at position i has token id ``GENE_OFFSET + i``.

    ``genes`` are the primary names (Ensembl ids where the source has them, else symbols);
    ``symbols`` the optional second name used for symbol matching.
    """

    def __init__(self, genes: Sequence[str], symbols: Sequence[str | None] | None = None, source: str | None = None):
        self.source = source
        self.genes: list[str] = [str(g).strip() for g in genes]
        if not self.genes:
            raise InputError(source, "genes", "a non-empty gene list", "no genes")
        if symbols is not None and len(symbols) != len(self.genes):
            raise InputError(source, "gene_symbol", f"{len(self.genes)} symbols, one per gene", len(symbols))
        self.symbols: list[str | None] = (
            [_clean(s) for s in symbols] if symbols is not None else [None] * len(self.genes)
        )

        self._by_name: dict[str, int] = {}  # exact primary names, e.g. "ENSG00000179826-2" (made unique)
        self._by_id: dict[str, int] = {}  # Ensembl ids without version
        self._by_symbol: dict[str, int] = {}
        ambiguous: set[str] = set()
        for position, (gene, symbol) in enumerate(zip(self.genes, self.symbols)):
            if not gene:
                raise InputError(source, f"gene {position}", "a non-empty gene name", repr(gene))
            key = strip_version(gene)
            if gene in self._by_name or key in self._by_id:
                raise InputError(
                    source, f"gene {position}", "unique gene names (they define the token ids)", f"{gene!r} repeated"
                )
            self._by_name[gene] = position
            if is_ensembl_id(gene):
                self._by_id[key] = position
            if symbol and symbol != gene:
                if symbol in self._by_symbol and self._by_symbol[symbol] != position:
                    ambiguous.add(symbol)
                else:
                    self._by_symbol.setdefault(symbol, position)
        for symbol in ambiguous:
            # Two vocabulary genes share a symbol: matching on it would be a guess, so only ids match them.
            del self._by_symbol[symbol]
        if ambiguous:
            log.info(
                "%s: %d symbols shared by several genes are matched by Ensembl id only (e.g. %s)",
                source or "vocabulary",
                len(ambiguous),
                sorted(ambiguous)[:5],
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_genes(
        cls, ids: Iterable[str], symbols: Iterable[str | None] | None = None, source: str | None = None
    ) -> Vocabulary:
        """Build a vocabulary from a panel: ``ids`` in token order, optional ``symbols`` beside them."""
        return cls(list(ids), None if symbols is None else list(symbols), source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> Vocabulary:
        """Read a Nicheformer-style ``model.h5ad`` (var_names in token order) or a gene list.

        A gene list is one gene per line (symbol or Ensembl id), optionally with a second
        tab- or comma-separated column (the symbol); a first line ``gene_id,gene_symbol``
        (or tab-separated) is read as a header. Blank lines and ``#`` comments are skipped.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(path, None, "an existing vocabulary file (.h5ad or a gene list)", "no such file")
        if path.suffix == ".h5ad":
            return cls._from_h5ad(path)
        return cls._from_text(path)

    @classmethod
    def _from_h5ad(cls, path: Path) -> Vocabulary:
        import h5py

        try:
            from anndata.io import read_elem
        except ImportError:  # anndata < 0.11
            from anndata.experimental import read_elem
        try:
            # Only the var table: a model.h5ad may carry a large X that a vocabulary does not need.
            with h5py.File(path, "r") as handle:
                var = read_elem(handle["var"])
        except Exception as exc:  # h5py / anndata raise many types for a broken file
            raise InputError(path, "var", "a readable AnnData (.h5ad) file", f"{type(exc).__name__}: {exc}") from exc
        symbol_column = next((c for c in _H5AD_SYMBOL_COLUMNS if c in var.columns), None)
        symbols = var[symbol_column].astype(str).tolist() if symbol_column else None
        return cls(var.index.astype(str).tolist(), symbols, source=str(path))

    @classmethod
    def _from_text(cls, path: Path) -> Vocabulary:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise InputError(path, None, "a UTF-8 text gene list", f"undecodable bytes ({exc.reason})") from exc
        rows = [_split_row(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not rows:
            raise InputError(path, None, "at least one gene, one per line", "an empty file")
        id_column, symbol_column = 0, 1
        header = [cell.lower() for cell in rows[0]]
        if header[0] in _HEADER_ID or header[0] in _HEADER_SYMBOL:
            rows = rows[1:]
            id_column = next((i for i, h in enumerate(header) if h in _HEADER_ID), None)
            symbol_column = next((i for i, h in enumerate(header) if h in _HEADER_SYMBOL), None)
            if id_column is None:
                id_column, symbol_column = symbol_column, None  # a list of symbols only
        widths = {len(r) for r in rows}
        if max(widths, default=0) > 2 and symbol_column is None and id_column == 0:
            raise InputError(
                path,
                "columns",
                "one or two columns (gene, optional symbol) or a header naming gene_id",
                f"{max(widths)} columns",
            )
        genes = [r[id_column] if id_column < len(r) else "" for r in rows]
        symbols = None
        if symbol_column is not None and any(len(r) > symbol_column for r in rows):
            symbols = [r[symbol_column] if symbol_column < len(r) else None for r in rows]
        return cls(genes, symbols, source=str(path))

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.genes)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} genes, source={self.source!r})"

    def position(self, gene: str) -> int:
        """Position of ``gene`` (Ensembl id, with or without version, or symbol); -1 if absent."""
        gene = str(gene).strip()
        found = self._position_of_id(gene)
        return found if found >= 0 else self._position_of_symbol(gene)

    def _position_of_id(self, gene_id: str) -> int:
        if gene_id in self._by_name:
            return self._by_name[gene_id]
        return self._by_id.get(strip_version(gene_id), -1)

    def _position_of_symbol(self, symbol: str) -> int:
        if symbol in self._by_symbol:
            return self._by_symbol[symbol]
        # A symbol-only gene list keeps the symbol as its primary name.
        return self._by_name.get(symbol, -1)

    def token_id(self, gene: str) -> int:
        """Token id of ``gene`` (Ensembl id or symbol); KeyError when it is not in the vocabulary."""
        position = self.position(gene)
        if position < 0:
            raise KeyError(
                f"gene {gene!r} is not in the vocabulary ({len(self)} genes, from {self.source or 'memory'}); "
                "genes are matched by Ensembl id, then by exact symbol"
            )
        return GENE_OFFSET + position

    def match(self, gene_ids: Sequence[str | None], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vocabulary position of each gene (-1 when absent) and whether it was matched by id.

        ``gene_ids`` are Ensembl ids (None or "" when unknown), ``names`` the symbols (an AnnData's
        var index). Order: Ensembl id, then exact symbol, then the name read as an id (for data
        whose var index already holds Ensembl ids).
        """
        positions = np.full(len(names), -1, dtype=np.int64)
        by_id = np.zeros(len(names), dtype=bool)
        for j, (gene_id, name) in enumerate(zip(gene_ids, names)):
            gene_id, name = _clean(gene_id), _clean(name)
            found = self._position_of_id(gene_id) if gene_id else -1
            if found >= 0:
                positions[j], by_id[j] = found, True
            elif name and (found := self._position_of_symbol(name)) >= 0:
                positions[j] = found
            elif name and is_ensembl_id(name) and (found := self._position_of_id(name)) >= 0:
                positions[j], by_id[j] = found, True
        return positions, by_id

    # ------------------------------------------------------------------ persistence
    def sha256(self) -> str:
        """Hash of the ordered primary gene names (UTF-8, one per line): identifies the token ids."""
        return hashlib.sha256("\n".join(self.genes).encode("utf-8")).hexdigest()

    def token_table(self) -> dict[str, int]:
        """Every token's id, special ones first: ``[MASK]``, ``[PAD]``, ``[CLS]``, the modality,
        organism and assay context tokens (``modality:spatial``, ``organism:human``, ``assay:xenium``),
        then each gene by its primary name (``GENE_OFFSET + position``)."""
        table = {"[MASK]": MASK, "[PAD]": PAD, "[CLS]": CLS}
        for kind, tokens in (("modality", MODALITY_TOKENS), ("organism", ORGANISM_TOKENS), ("assay", ASSAY_TOKENS)):
            table.update({f"{kind}:{name}": token for name, token in tokens.items()})
        table.update({gene: GENE_OFFSET + i for i, gene in enumerate(self.genes)})
        return table

    def save_json(self, path: str | Path) -> Path:
        """``vocab.json`` as Hugging Face-style tokenizers keep it: {token: id}, plus the gene symbols."""
        path = Path(path)
        doc = {
            "vocab": self.token_table(),
            "gene_offset": GENE_OFFSET,
            "symbols": {g: s for g, s in zip(self.genes, self.symbols) if s},
            "sha256": self.sha256(),
        }
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def save(self, path: str | Path) -> Path:
        """Write a ``gene_id<TAB>gene_symbol`` list (header included) that ``from_file`` reads back."""
        path = Path(path)
        lines = ["gene_id\tgene_symbol"] + [f"{g}\t{s or ''}" for g, s in zip(self.genes, self.symbols)]
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


def _clean(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    text = str(value).strip()
    return text if text and text.lower() not in {"nan", "none"} else None


def _split_row(line: str) -> list[str]:
    separator = "\t" if "\t" in line else ","
    return [cell.strip() for cell in line.rstrip("\r\n").split(separator)]

"""Rank tokenization: slow reference from the formula, Nicheformer files, properties, vocabulary I/O."""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InputError
from data_shards.tokenize import (
    ASSAY_TOKENS,
    GENE_OFFSET,
    MODALITY_TOKENS,
    ORGANISM_TOKENS,
    PAD,
    Vocabulary,
    compute_tech_mean,
    load_tech_mean,
    rank_tokens,
    rank_tokens_with_report,
    save_tech_mean,
)

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
NICHEFORMER_VOCAB = FIXTURES / "nicheformer" / "model.h5ad"
XENIUM_MEAN = FIXTURES / "nicheformer" / "xenium_mean_script.npy"
XOA1_MATRIX = FIXTURES / "xenium" / "xoa1_small" / "cell_feature_matrix.h5"
XENIUM_SPATIAL_HUMAN = [9, 4, 5]


# ---------------------------------------------------------------------------- slow reference
def reference_tokens(counts, var_vocab_position, vocab_mean, context_length, context=XENIUM_SPATIAL_HUMAN):
    """The paper's formula with exact fractions and python loops.

    counts: list of cells, each a list of counts per AnnData gene; var_vocab_position: vocabulary
    position of each AnnData gene (-1: not in the vocabulary); vocab_mean: per vocabulary
    position (NaN / 0 count as 1). Cell total over vocabulary genes; genes sharing a vocabulary
    position are summed; ties go to the lower token id.
    """
    rows = []
    for cell in counts:
        per_position: dict[int, int] = {}
        for count, position in zip(cell, var_vocab_position):
            if position >= 0:
                per_position[position] = per_position.get(position, 0) + int(count)
        total = sum(per_position.values())
        scored = []
        for position, count in per_position.items():
            if count == 0:
                continue
            mean = float(vocab_mean[position])
            divisor = Fraction(1) if (math.isnan(mean) or mean == 0) else Fraction(mean)
            scored.append((Fraction(count, total) * 10_000 / divisor, GENE_OFFSET + position))
        ranked = sorted(scored, key=lambda value_token: (-value_token[0], value_token[1]))
        row = list(context) + [token for _, token in ranked][: context_length - 3]
        rows.append(row + [PAD] * (context_length - len(row)))
    return np.array(rows, dtype=np.int32)


def make_adata(counts, symbols, gene_ids=None, sparse=True) -> ad.AnnData:
    counts = np.asarray(counts, dtype=np.int64).reshape(len(counts), len(symbols))
    var = pd.DataFrame(index=pd.Index(symbols, dtype=str))
    if gene_ids is not None:
        var["gene_ids"] = gene_ids
    return ad.AnnData(X=sp.csr_matrix(counts) if sparse else counts, var=var)


@pytest.fixture(scope="module")
def nicheformer_vocab() -> Vocabulary:
    return Vocabulary.from_file(NICHEFORMER_VOCAB)


@pytest.fixture(scope="module")
def nicheformer_ids() -> list[str]:
    """Vocabulary order read straight from the file, independent of Vocabulary."""
    with h5py.File(NICHEFORMER_VOCAB, "r") as f:
        index_key = f["var"].attrs["_index"]
        return [x.decode() if isinstance(x, bytes) else str(x) for x in f["var"][index_key][:]]


# ---------------------------------------------------------------------------- Nicheformer compatibility
def test_nicheformer_vocabulary_ids_are_30_plus_position(nicheformer_vocab, nicheformer_ids):
    assert len(nicheformer_vocab) == len(nicheformer_ids) == 20_310
    for position in (0, 1, 7_777, 20_158, 20_159, 20_309):  # first, human, last human, first mouse, last
        assert nicheformer_vocab.token_id(nicheformer_ids[position]) == 30 + position
    assert ASSAY_TOKENS["xenium"] == 9 and MODALITY_TOKENS["spatial"] == 4 and ORGANISM_TOKENS["human"] == 5
    assert ASSAY_TOKENS["merfish"] == 7 and ASSAY_TOKENS["cosmx"] == 8 and MODALITY_TOKENS["dissociated"] == 3
    assert ORGANISM_TOKENS["mouse"] == 6 and max(ASSAY_TOKENS.values()) == 18
    # 40 entries were made unique by anndata ("ENSG00000179826-2"); they match as given, by id.
    made_unique = nicheformer_ids.index("ENSG00000179826-2")
    positions, by_id = nicheformer_vocab.match(["ENSG00000179826-2", "ENSG00000179826.4"], ["X", "Y"])
    assert positions.tolist() == [made_unique, nicheformer_ids.index("ENSG00000179826")] and by_id.all()


def test_matches_reference_on_nicheformer_files(nicheformer_vocab, nicheformer_ids):
    means = np.load(XENIUM_MEAN)
    rng = np.random.default_rng(0)
    measured = rng.choice(np.flatnonzero(np.isfinite(means)), size=8, replace=False)
    unmeasured = rng.choice(np.flatnonzero(np.isnan(means)), size=4, replace=False)
    positions = np.concatenate([measured, unmeasured])
    rng.shuffle(positions)
    counts = rng.poisson(rng.gamma(0.6, 4.0, size=positions.size), size=(40, positions.size))
    counts[3] = 0  # a cell with no counts at all
    ids = [nicheformer_ids[p] for p in positions]
    adata = make_adata(counts, [f"SYM{k}" for k in range(positions.size)], ids)

    context_length = 10  # short enough that some cells are truncated
    tokens = rank_tokens(adata, NICHEFORMER_VOCAB, XENIUM_MEAN, context_length=context_length)

    expected = reference_tokens(counts.tolist(), positions.tolist(), means, context_length)
    assert tokens.dtype == np.int32 and tokens.shape == (40, context_length)
    np.testing.assert_array_equal(tokens, expected)
    assert (tokens[:, :3] == XENIUM_SPATIAL_HUMAN).all()
    assert (tokens[3, 3:] == PAD).all()
    genes = tokens[:, 3:][tokens[:, 3:] != PAD]
    assert set(nicheformer_ids[t - 30] for t in genes) <= set(ids)


def test_nan_mean_counts_as_one(nicheformer_vocab, nicheformer_ids):
    means = np.load(XENIUM_MEAN)
    high_mean = int(np.nanargmax(means))  # mean ~975: 50 counts -> 50/975 ≈ 0.05 (× scale)
    never_measured = int(np.flatnonzero(np.isnan(means))[0])  # NaN mean -> divisor 1
    adata = make_adata([[50, 5]], ["A", "B"], [nicheformer_ids[high_mean], nicheformer_ids[never_measured]])
    tokens = rank_tokens(adata, nicheformer_vocab, means, context_length=5)
    assert tokens[0].tolist() == [9, 4, 5, 30 + never_measured, 30 + high_mean]
    # Without the technology mean the higher count wins.
    assert rank_tokens(adata, nicheformer_vocab, None, context_length=5)[0, 3] == 30 + high_mean


def test_xoa1_fixture_genes_match_nicheformer_vocabulary_by_id(nicheformer_vocab, nicheformer_ids):
    with h5py.File(XOA1_MATRIX, "r") as f:
        matrix = f["matrix"]
        ids = [x.decode() for x in matrix["features/id"][:]]
        symbols = [x.decode() for x in matrix["features/name"][:]]
        n_genes, n_cells = (int(v) for v in matrix["shape"][:])
        # 10x stores genes × cells CSC, i.e. cells × genes CSR; this file has float64 indices.
        counts = sp.csr_matrix(
            (
                matrix["data"][:].astype(np.int64),
                matrix["indices"][:].astype(np.int64),
                matrix["indptr"][:].astype(np.int64),
            ),
            shape=(n_cells, n_genes),
        )
    positions = [nicheformer_ids.index(gene_id) for gene_id in ids]
    assert [nicheformer_vocab.token_id(gene_id) for gene_id in ids] == [30 + p for p in positions]
    # The vocabulary has no symbols, so only the Ensembl ids make these genes match.
    assert all(nicheformer_vocab.position(symbol) == -1 for symbol in symbols)

    adata = ad.AnnData(X=counts, var=pd.DataFrame({"gene_ids": ids}, index=symbols))
    tokens, report = rank_tokens_with_report(adata, nicheformer_vocab, XENIUM_MEAN, context_length=8)
    assert report.n_genes_matched == report.n_matched_by_id == 4 and report.unmatched_genes == []
    expected = reference_tokens(counts.toarray().tolist(), positions, np.load(XENIUM_MEAN), 8)
    np.testing.assert_array_equal(tokens, expected)


# ---------------------------------------------------------------------------- ordering and ties
def test_ties_go_to_lower_token_id():
    vocab = Vocabulary.from_genes(["G0", "G1", "G2", "G3"])
    # var order differs from vocabulary order, so a tie broken by var position would fail.
    adata = make_adata([[4, 4, 4, 1]], ["G3", "G2", "G0", "G1"])
    assert rank_tokens(adata, vocab, context_length=7)[0].tolist() == [9, 4, 5, 30, 32, 33, 31]
    # Exact ties through different means: 3/1 == 9/3 == 6/2.
    adata = make_adata([[9, 3, 6]], ["G2", "G1", "G0"])
    tokens = rank_tokens(adata, vocab, tech_mean=np.array([2.0, 1.0, 3.0, 5.0]), context_length=6)
    assert tokens[0].tolist() == [9, 4, 5, 30, 31, 32]
    # Explicitly stored zeros are not expressed genes.
    stored_zero = sp.csr_matrix((np.array([0.0, 2.0]), np.array([0, 1]), np.array([0, 2])), shape=(1, 2))
    adata = ad.AnnData(X=stored_zero, var=pd.DataFrame(index=["G0", "G1"]))
    assert rank_tokens(adata, vocab, context_length=6)[0].tolist() == [9, 4, 5, 31, PAD, PAD]


def test_context_tokens_and_aliases():
    vocab = Vocabulary.from_genes(["G0"])
    adata = make_adata([[1]], ["G0"])
    tokens = rank_tokens(
        adata, vocab, context_length=4, assay="MERFISH", modality="dissociated", organism="Mus musculus"
    )
    assert tokens[0].tolist() == [7, 3, 6, 30]
    assert rank_tokens(adata, vocab, context_length=3).tolist() == [XENIUM_SPATIAL_HUMAN]
    with pytest.raises(InputError, match="assay"):
        rank_tokens(adata, vocab, assay="visium-hd")
    with pytest.raises(InputError, match="context_length"):
        rank_tokens(adata, vocab, context_length=2)


def test_chunking_dense_input_and_both_ranking_paths_agree():
    rng = np.random.default_rng(1)
    genes = [f"G{k}" for k in range(30)]
    vocab = Vocabulary.from_genes(genes[::-1])
    counts = rng.poisson(0.8, size=(257, 30))
    # Multiples of 1/4 are exact in binary, so exact ties (1/6.25 == 3/18.75) stay ties in the reference too;
    # with decimals such as 6.05 and 18.15 the float division ties where exact arithmetic would not.
    means = rng.integers(2, 80, size=30) / 4
    adata = make_adata(counts, genes)
    one_chunk = rank_tokens(adata, vocab, means, context_length=20)
    small_chunks, _ = rank_tokens_with_report(adata, vocab, means, context_length=20, chunk_rows=16)
    dense = rank_tokens(make_adata(counts, genes, sparse=False), vocab, means, context_length=20)
    np.testing.assert_array_equal(one_chunk, small_chunks)
    np.testing.assert_array_equal(one_chunk, dense)
    vocab_position = [vocab.position(g) for g in genes]
    np.testing.assert_array_equal(one_chunk, reference_tokens(counts.tolist(), vocab_position, means, 20))
    # A huge count sends ranking through the sort-every-value path instead of the lookup table.
    counts[0, 0] = 50_000_000
    big = rank_tokens(make_adata(counts, genes), vocab, means, context_length=20)
    np.testing.assert_array_equal(big, reference_tokens(counts.tolist(), vocab_position, means, 20))


def test_bad_counts_and_means_raise_input_error():
    vocab = Vocabulary.from_genes(["G0", "G1"])
    with pytest.raises(InputError, match="non-negative finite counts"):
        rank_tokens(make_adata([[1, -2]], ["G0", "G1"]), vocab)
    with pytest.raises(InputError, match="tech_mean"):
        rank_tokens(make_adata([[1, 2]], ["G0", "G1"]), vocab, tech_mean=np.array([1.0, -3.0]))


# ---------------------------------------------------------------------------- property tests
@st.composite
def tokenization_cases(draw):
    n_cells = draw(st.integers(1, 6))
    n_var = draw(st.integers(1, 8))
    vocab_size = draw(st.integers(n_var, n_var + 4))
    # Each var gene maps to a distinct vocabulary gene or lies outside it (at least one inside).
    positions = draw(st.permutations(range(vocab_size)))[:n_var]
    outside = draw(st.lists(st.booleans(), min_size=n_var, max_size=n_var))
    outside[draw(st.integers(0, n_var - 1))] = False
    counts = draw(
        st.lists(st.lists(st.integers(0, 40), min_size=n_var, max_size=n_var), min_size=n_cells, max_size=n_cells)
    )
    means = draw(
        st.lists(
            st.sampled_from([math.nan, 0.0, 1.0, 2.0, 3.0, 0.5, 7.25, 48.2, 133.0]),
            min_size=vocab_size,
            max_size=vocab_size,
        )
    )
    context_length = draw(st.integers(3, 12))
    return counts, [-1 if o else p for p, o in zip(positions, outside)], vocab_size, np.array(means), context_length


@settings(max_examples=60, deadline=None)
@given(tokenization_cases())
def test_properties_against_reference(case):
    counts, var_position, vocab_size, means, context_length = case
    vocab = Vocabulary.from_genes([f"V{k}" for k in range(vocab_size)])
    symbols = [f"V{p}" if p >= 0 else f"OUT{j}" for j, p in enumerate(var_position)]
    adata = make_adata(counts, symbols)

    tokens, report = rank_tokens_with_report(adata, vocab, means, context_length=context_length)
    np.testing.assert_array_equal(tokens, reference_tokens(counts, var_position, means, context_length))
    np.testing.assert_array_equal(
        tokens, rank_tokens(adata, vocab, means, context_length=context_length)
    )  # deterministic
    assert report.unmatched_genes == [s for s, p in zip(symbols, var_position) if p < 0]

    divisor = np.where(np.isfinite(means) & (means > 0), means, 1.0)
    for cell, row in zip(counts, tokens):
        assert row[:3].tolist() == XENIUM_SPATIAL_HUMAN
        genes = row[3:]
        n_genes = int(np.count_nonzero(genes != PAD))
        assert (genes[:n_genes] != PAD).all() and (genes[n_genes:] == PAD).all()  # padding only at the end
        nonzero_in_vocab = sum(1 for c, p in zip(cell, var_position) if p >= 0 and c > 0)
        assert n_genes == min(nonzero_in_vocab, context_length - 3)
        assert len(set(genes[:n_genes].tolist())) == n_genes
        count_of = {p: c for c, p in zip(cell, var_position) if p >= 0}
        values = [Fraction(count_of[t - 30]) / Fraction(divisor[t - 30]) for t in genes[:n_genes]]
        assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing value


# ---------------------------------------------------------------------------- gene matching and reporting
def test_match_by_id_then_symbol_and_report_unmatched(caplog):
    vocab = Vocabulary.from_genes(["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"], ["AAA", "BBB", "CCC"])
    adata = make_adata(
        [[1, 2, 3, 4, 5]], ["XXX", "BBB", "ccc", "NOPE", "ZZZ"], ["ENSG00000000001.7", "", "", None, "ENSG99999999999"]
    )
    with caplog.at_level(logging.WARNING, logger="data_shards.tokenize"):
        tokens, report = rank_tokens_with_report(adata, vocab, context_length=6)
    assert report.n_matched_by_id == 1 and report.n_matched_by_symbol == 1
    # No case-insensitive match: "ccc" would be a guess (human/mouse symbols differ only by case).
    assert report.unmatched_genes == ["ccc", "NOPE", "ZZZ"]
    assert "3 of 5 genes are not in the vocabulary" in caplog.text and "NOPE" in caplog.text
    # Cell total over vocabulary genes is irrelevant to order; only BBB (2) and the id match (1) remain.
    assert tokens[0].tolist() == [9, 4, 5, 31, 30, PAD]


def test_every_gene_outside_the_vocabulary_raises(tmp_path):
    path = tmp_path / "genes.txt"
    path.write_text("AAA\nBBB\n")
    with pytest.raises(InputError) as excinfo:
        rank_tokens(make_adata([[1, 1]], ["XXX", "YYY"]), path)
    assert str(path) in str(excinfo.value) and "XXX" in str(excinfo.value)


def test_genes_sharing_a_vocabulary_entry_are_summed():
    vocab = Vocabulary.from_genes(["ENSG00000000001", "ENSG00000000002"], ["AAA", "BBB"])
    adata = make_adata([[2, 2, 3]], ["AAA", "AAA-dup", "BBB"], ["ENSG00000000001", "ENSG00000000001", ""])
    tokens, report = rank_tokens_with_report(adata, vocab, context_length=6)
    assert report.merged_genes == ["AAA-dup"]
    assert tokens[0].tolist() == [9, 4, 5, 30, 31, PAD]  # 2 + 2 = 4 > 3


# ---------------------------------------------------------------------------- vocabulary files
def test_vocabulary_file_formats_and_round_trip(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("# panel\nACTA2\n\nENSG00000107796.3\nKRT5\n")
    vocab = Vocabulary.from_file(plain)
    assert vocab.genes == ["ACTA2", "ENSG00000107796.3", "KRT5"]
    assert vocab.token_id("KRT5") == 32 and vocab.token_id("ENSG00000107796") == 31

    two_columns = tmp_path / "two.tsv"
    two_columns.write_text("ENSG00000107796\tACTA2\nENSG00000186081\tKRT5\n")
    csv = tmp_path / "panel.csv"
    csv.write_text("gene_id,gene_symbol\nENSG00000107796,ACTA2\nENSG00000186081,KRT5\n")
    for path in (two_columns, csv):
        v = Vocabulary.from_file(path)
        assert v.genes == ["ENSG00000107796", "ENSG00000186081"] and v.symbols == ["ACTA2", "KRT5"]
        assert v.token_id("KRT5") == v.token_id("ENSG00000186081") == 31
    assert Vocabulary.from_file(two_columns).sha256() == Vocabulary.from_file(csv).sha256()

    saved = Vocabulary.from_file(csv).save(tmp_path / "out" / "vocab.tsv")
    again = Vocabulary.from_file(saved)
    assert again.genes == ["ENSG00000107796", "ENSG00000186081"] and again.symbols == ["ACTA2", "KRT5"]
    assert again.sha256() == Vocabulary.from_file(csv).sha256() != vocab.sha256()
    assert not list(saved.parent.glob(".*partial"))

    h5ad = tmp_path / "model.h5ad"
    ad.AnnData(
        X=np.zeros((1, 2)),
        var=pd.DataFrame({"gene_symbol": ["ACTA2", "KRT5"]}, index=["ENSG00000107796", "ENSG00000186081"]),
    ).write_h5ad(h5ad)
    from_h5ad = Vocabulary.from_file(h5ad)
    assert from_h5ad.sha256() == again.sha256() and from_h5ad.token_id("KRT5") == 31

    with pytest.raises(KeyError, match="'MYC' is not in the vocabulary"):
        vocab.token_id("MYC")
    with pytest.raises(KeyError):
        vocab.token_id("acta2")
    duplicated = tmp_path / "dup.txt"
    duplicated.write_text("A\nB\nA\n")
    with pytest.raises(InputError, match="repeated"):
        Vocabulary.from_file(duplicated)
    with pytest.raises(InputError, match="no such file"):
        Vocabulary.from_file(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------- technology mean
def test_load_tech_mean_checks_length(tmp_path, nicheformer_vocab):
    means = load_tech_mean(XENIUM_MEAN, nicheformer_vocab)
    assert means.shape == (20_310,) and np.isfinite(means).sum() == 1_735
    short = tmp_path / "short.npy"
    np.save(short, np.ones(5))
    with pytest.raises(InputError) as excinfo:
        load_tech_mean(short, nicheformer_vocab)
    assert str(short) in str(excinfo.value) and "20310" in str(excinfo.value) and "5 values" in str(excinfo.value)


def test_compute_tech_mean_is_the_nonzero_mean_of_normalised_counts(tmp_path):
    vocab = Vocabulary.from_genes(["G0", "G1", "G2", "G3"])
    counts = [[1, 3, 0, 6], [0, 2, 0, 8], [0, 0, 0, 0]]  # column 3 is outside the vocabulary
    first = make_adata(counts, ["G1", "G0", "G2", "OUTSIDE"])
    second = make_adata([[5, 5]], ["G0", "G1"])
    means = compute_tech_mean(iter([first, second]), vocab)  # slides pooled, read one at a time
    # Cell totals over vocabulary genes: 4, 2 and 10. G0: 3/4, 2/2, 5/10; G1: 1/4, 5/10 (× 10,000).
    np.testing.assert_allclose(means[:2], [(7_500 + 10_000 + 5_000) / 3, (2_500 + 5_000) / 2])
    assert np.isnan(means[2]) and np.isnan(means[3])  # measured but never detected; not measured
    path = save_tech_mean(tmp_path / "tech_mean.npy", means)
    np.testing.assert_array_equal(load_tech_mean(path, vocab), means)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tech_mean.npy"]

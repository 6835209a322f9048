"""Cell embeddings from shards with the exported cell encoder: same numbers as the model, per-slide files, checks."""

from __future__ import annotations

import copy
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

from common.atomic import write_json
from common.errors import InputError
from data_shards.sample import encode_sample
from data_shards.vocabulary import Vocabulary
from data_shards.writer import TarSampleWriter
from finetune.embed import embed_cells
from finetune.survival import Cohort, read_cell_embeddings
from pretrain.export import PretrainedCellEncoder
from pretrain.models import build_model

N_GENES = 50
CONTEXT = 12
MODEL = {
    "image": {
        "arch": "vit_tiny_patch16_224",
        "kwargs": {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2},
    },
    "cell": {"dim": 32, "heads": 4, "ff_dim": 64, "layers": 2, "context_length": CONTEXT, "vocab_size": 30 + N_GENES},
    "graph": {"node_encoder": "transformer", "gat_layers": 1, "gat_heads": 2, "hidden": 16, "radius_um": 25.0},
    "fusion": {"heads": 4},
    "proj_dim": 8,
}


def _vocabulary() -> Vocabulary:
    return Vocabulary.from_genes(
        [f"ENSG{i:011d}" for i in range(N_GENES)], [f"G{i}" for i in range(N_GENES)], source="panel"
    )


def _tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = np.ones((n, CONTEXT), dtype=np.int32)
    for row in rows:
        length = int(rng.integers(5, CONTEXT + 1))
        row[:3] = (9, 4, 5)
        row[3:length] = rng.permutation(N_GENES)[: length - 3] + 30
    return rows


def _write_shards(root: Path, cells_per_slide: dict[str, int], seed: int = 0) -> tuple[Path, list[dict]]:
    """One tar per slide with random tokens and 0-3 neighbours per cell; the manifest; the samples' inputs."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary()
    root.mkdir(parents=True)
    vocab.save(root / "vocab.tsv")
    shards, inputs = [], []
    for slide, n in cells_per_slide.items():
        path = root / f"{slide}-000000.tar"
        with open(path, "wb") as stream:
            writer = TarSampleWriter(stream)
            for i in range(n):
                m = int(rng.integers(0, 4))
                cell = {
                    "tokens": _tokens(rng, 1)[0],
                    "nbr_tokens": _tokens(rng, m).reshape(m, CONTEXT),
                    "nbr_offsets_um": (rng.normal(size=(m, 2)) * 15).astype(np.float32),
                }
                meta = {"slide": slide, "cell_id": f"c{i}", "x_um": float(i), "y_um": float(2 * i), "patient": slide}
                writer.write(
                    encode_sample(
                        f"{slide}_{i:05d}", b"", cell["tokens"], cell["nbr_tokens"], cell["nbr_offsets_um"], meta
                    )
                )
                inputs.append({**cell, "slide": slide})
            writer.close()
        shards.append({"path": path.name, "n_samples": n, "slide": slide})
    write_json(
        root / "manifest.json",
        {
            "format_version": 1,
            "n_samples": sum(cells_per_slide.values()),
            "n_shards": len(shards),
            "shards": shards,
            "vocabulary": {"path": "vocab.tsv", "sha256": vocab.sha256(), "size": len(vocab), "source": "panel"},
            "tech_mean": None,
            "slides": {s: {"slide": s} for s in cells_per_slide},
            "config": {
                "tokens": {"context_length": CONTEXT, "assay": "xenium", "modality": "spatial", "organism": "human"}
            },
        },
    )
    return root / "manifest.json", inputs


def _cell_encoder(vocab_sha: str) -> PretrainedCellEncoder:
    torch.manual_seed(0)
    tower = build_model(copy.deepcopy(MODEL)).eval()
    tower.image_encoder = None
    tokenizer = {
        "context_length": CONTEXT,
        "assay": "xenium",
        "modality": "spatial",
        "organism": "human",
        "vocabulary_sha256": vocab_sha,
    }
    return PretrainedCellEncoder(tower, _vocabulary(), None, tokenizer, {"model": MODEL}).eval()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("cells") / "shards", {"s0": 7, "s1": 5})


def _reference(encoder: PretrainedCellEncoder, cell: dict) -> np.ndarray:
    """The cell tower on one cell alone, straight from its arrays."""
    m = len(cell["nbr_tokens"])
    with torch.no_grad():
        out = encoder(
            torch.as_tensor(cell["tokens"][None], dtype=torch.long),
            torch.as_tensor(cell["nbr_tokens"], dtype=torch.long),
            torch.as_tensor(cell["nbr_offsets_um"]),
            torch.zeros(m, dtype=torch.long),
        )
    return out[0].numpy()


@pytest.mark.parametrize("batch_size", [3, 64])
def test_embeddings_match_the_tower_cell_by_cell_whatever_the_batching(shards, tmp_path, batch_size):
    manifest, inputs = shards
    encoder = _cell_encoder(_vocabulary().sha256())
    files = embed_cells(encoder, manifest, tmp_path / "emb", batch_size=batch_size, progress=False)
    assert sorted(files) == ["s0", "s1"]
    got = np.concatenate([anndata.read_h5ad(files[s]).X for s in ("s0", "s1")])
    expected = np.stack([_reference(encoder, cell) for cell in inputs])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    adata = anndata.read_h5ad(files["s1"])
    assert list(adata.obs["cell_id"]) == [f"c{i}" for i in range(5)]
    assert adata.uns["embedding"]["kind"] == "cells" and adata.uns["embedding"]["which"] == "projected"


def test_cell_feature_option_and_patient_means_for_past_multi(shards, tmp_path):
    manifest, inputs = shards
    encoder = _cell_encoder(_vocabulary().sha256())
    files = embed_cells(encoder, manifest, tmp_path / "emb", which="cell", progress=False)
    with torch.no_grad():
        tokens = torch.as_tensor(np.stack([c["tokens"] for c in inputs if c["slide"] == "s0"]), dtype=torch.long)
        expected = encoder.tower.cell_encoder(tokens).numpy()  # (7, dim) transformer feature alone
    np.testing.assert_allclose(anndata.read_h5ad(files["s0"]).X, expected, rtol=1e-4, atol=1e-5)
    # A patient with both slides gets the mean over all 12 cells; one with s1 only, over its 5.
    cohort = Cohort(
        case_ids=["A", "B"],
        slide_ids=[["s0", "s1"], ["s1"]],
        survival_months=np.array([1.0, 2.0]),
        censored=np.array([False, True]),
        omics={},
        omic_columns={},
    )
    means = read_cell_embeddings(tmp_path / "emb", cohort)
    both = np.concatenate([anndata.read_h5ad(files[s]).X for s in ("s0", "s1")])
    np.testing.assert_allclose(means[0], both.mean(0), rtol=1e-5)
    np.testing.assert_allclose(means[1], anndata.read_h5ad(files["s1"]).X.mean(0), rtol=1e-5)


def test_shards_tokenised_with_another_vocabulary_are_refused(shards, tmp_path):
    manifest, _ = shards
    encoder = _cell_encoder("0" * 64)
    with pytest.raises(InputError, match=r"vocabulary\.sha256"):
        embed_cells(encoder, manifest, tmp_path / "emb", progress=False)
    assert not (tmp_path / "emb" / "s0.h5ad").exists()
    with pytest.raises(InputError, match="which"):
        embed_cells(_cell_encoder(_vocabulary().sha256()), manifest, tmp_path / "emb", which="image", progress=False)

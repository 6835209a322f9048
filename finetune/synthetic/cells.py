"""Tiny synthetic shard sets with planted image → expression signal, for tests of the downstream heads.

:func:`write_synthetic_cells` writes, per slide, a minimal Xenium bundle (``experiment.xenium``,
``cells.parquet``, ``cell_feature_matrix.h5``) and webdataset shards of small crops whose colour
encodes a latent value ``t`` in [0, 1]; the first gene's counts follow ``t``, the others are noise.
A shard manifest (``format_version`` 1, with each slide's bundle and meta, and the panel as its vocabulary,
``vocab.tsv``) ties them together.
Only the sample members the heads read are written (``jpg``, ``json``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import webdataset as wds
from PIL import Image

from common.atomic import write_json
from data_shards.manifest import FORMAT_VERSION, MANIFEST_NAME
from data_shards.synthetic.xenium_writer import write_feature_matrix
from data_shards.vocabulary import Vocabulary


def colour_crop(t: float, size_px: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (size, size, 3) H&E-like crop whose background colour encodes ``t`` ∈ [0, 1].

    Nuisance content independent of ``t`` (dark "nuclei" of random number, place and size, and a
    random brightness) spreads the crops over many image features, as real tissue does, so that a
    model fit on shuffled labels finds no direction that happens to follow ``t``.
    """
    base = np.array([110 + 80 * t, 90 + rng.normal(0, 35), 190 - 60 * t])
    image = base + rng.normal(0, 12, size=(size_px, size_px, 3))
    yy, xx = np.mgrid[0:size_px, 0:size_px]
    for _ in range(int(rng.integers(0, 7))):
        cy, cx = rng.uniform(0, size_px, 2)
        radius = rng.uniform(size_px / 16, size_px / 6)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        image[inside] = np.array([70.0, 40.0, 120.0]) + rng.normal(0, 10, size=(int(inside.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _gene_ids(n_genes: int) -> list[str]:
    """Ensembl-like ids of the synthetic genes G0, G1, ..."""
    return [f"ENSG9{i:010d}" for i in range(n_genes)]


def _write_bundle(
    folder: Path, cell_ids: Sequence[str], xy_um: np.ndarray, counts: sp.csr_matrix, genes: Sequence[str]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "experiment.xenium", {"pixel_size": 0.2125, "analysis_sw_version": "synthetic"})
    totals = np.asarray(counts.sum(axis=1)).ravel()
    pd.DataFrame(
        {
            "cell_id": list(cell_ids),
            "x_centroid": xy_um[:, 0],
            "y_centroid": xy_um[:, 1],
            "cell_area": np.full(len(cell_ids), 80.0),
            "nucleus_area": np.full(len(cell_ids), 25.0),
            "transcript_counts": totals.astype(np.int64),
        }
    ).to_parquet(folder / "cells.parquet", index=False)
    n = len(genes)
    write_feature_matrix(
        folder / "cell_feature_matrix.h5",
        counts,
        np.asarray(cell_ids),
        np.array(_gene_ids(n)),
        np.asarray(genes),
        np.array(["Gene Expression"] * n),
    )


def write_synthetic_cells(
    out_dir: str | Path,
    slides: Sequence[Mapping[str, Any]],
    n_genes: int = 6,
    crop_px: int = 32,
    extent_um: float = 1000.0,
    samples_per_shard: int = 150,
    seed: int = 0,
) -> Path:
    """Write bundles + shards + manifest under ``out_dir``; the manifest path.

    ``slides``: ``[{"id", "n_cells", "meta": {...}}]``. Gene ``G0`` is the signal gene (mean count
    20 + 400·t), the others ``G1…`` Poisson noise around 100. Cells sit uniformly at random in a
    square of ``extent_um`` µm; ``t`` is uniform and independent of position. Each sample json
    also carries the ``t`` it was drawn with.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    shards, slide_entries = [], {}
    for slide in slides:
        slide_id, n_cells, meta = str(slide["id"]), int(slide["n_cells"]), dict(slide.get("meta") or {})
        t = rng.uniform(0, 1, n_cells)
        xy_um = rng.uniform(0, extent_um, size=(n_cells, 2))
        rates = np.column_stack([20 + 400 * t] + [np.full(n_cells, 100.0)] * (n_genes - 1))
        counts = sp.csr_matrix(rng.poisson(rates).astype(np.int32))  # (n_cells, n_genes)
        cell_ids = [f"{slide_id}-c{i:05d}" for i in range(n_cells)]
        bundle = out_dir / "bundles" / slide_id
        _write_bundle(bundle, cell_ids, xy_um, counts, genes)
        (out_dir / "shards" / slide_id).mkdir(parents=True, exist_ok=True)
        order = rng.permutation(n_cells)  # shards are shuffled, like the real ones
        for k, start in enumerate(range(0, n_cells, samples_per_shard)):
            rows = order[start : start + samples_per_shard]
            relative = f"{slide_id}/{slide_id}-{k:06d}.tar"
            with wds.TarWriter(str(out_dir / "shards" / relative)) as sink:
                for i in rows:
                    sample = {
                        "cell_id": cell_ids[i],
                        "slide": slide_id,
                        "x_um": float(xy_um[i, 0]),
                        "y_um": float(xy_um[i, 1]),
                        "he_x_px": float(xy_um[i, 0] * 2),
                        "he_y_px": float(xy_um[i, 1] * 2),
                        "crop_um_per_px": 0.5,
                        "registration_region": int(xy_um[i, 0] > extent_um / 2),
                        "t": float(t[i]),
                        **meta,
                    }
                    sink.write(
                        {
                            "__key__": f"{slide_id}_{i:08d}",
                            "jpg": _jpeg(colour_crop(t[i], crop_px, rng)),
                            "json": json.dumps(sample).encode(),
                        }
                    )
            shards.append({"path": relative, "n_samples": int(len(rows)), "slide": slide_id})
        slide_entries[slide_id] = {
            "slide": slide_id,
            "bundle": str(bundle.resolve()),
            "n_samples": n_cells,
            "meta": meta,
        }
    # The panel as the shards' vocabulary (every manifest records one; these shards carry no tokens).
    vocab = Vocabulary.from_genes(_gene_ids(n_genes), genes, source="synthetic panel")
    vocab_path = vocab.save(out_dir / "shards" / "vocab.tsv")
    vocabulary = {"path": vocab_path.name, "sha256": vocab.sha256(), "size": len(vocab), "source": "synthetic panel"}
    manifest = {
        "format_version": FORMAT_VERSION,
        "n_samples": sum(s["n_samples"] for s in shards),
        "n_shards": len(shards),
        "shards": shards,
        "sample_keys": ["jpg", "json"],
        "vocabulary": vocabulary,
        "tech_mean": None,
        "slides": slide_entries,
        "config": {"matrix": "h5"},
    }
    return write_json(out_dir / "shards" / MANIFEST_NAME, manifest)


__all__ = ["colour_crop", "write_synthetic_cells"]

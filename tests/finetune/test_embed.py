"""Embedding extraction: encoder sources, one file per slide from shards, tissue tiles of a whole slide."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.errors import InputError
from data_shards.manifest import load_manifest
from data_shards.ome_tiff import tiles_from_array, write_pyramidal_ome_tiff
from data_shards.sample import decode_jpeg
from finetune.embed import embed_images, embed_shards, embed_slide_tiles, read_embeddings, run_embed
from finetune.encoders import load_encoder, random_like
from finetune.synthetic import write_synthetic_cells, write_tiny_export

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("embed")
    manifest = write_synthetic_cells(
        root / "data",
        [
            {"id": "s1", "n_cells": 130, "meta": {"patient": "P1", "cancer_type": "SKCM"}},
            {"id": "s2", "n_cells": 70, "meta": {"patient": "P2", "cancer_type": "BRCA"}},
        ],
        samples_per_shard=50,
        seed=1,
    )
    export = write_tiny_export(root / "export", kwargs=TINY_VIT, proj_dim=16, seed=2)
    return {"root": root, "manifest": manifest, "export": export}


# ---------------------------------------------------------------------------------------------
# Encoder sources


def test_export_source_matches_pretrain_loader_and_random_baseline_differs(assets):
    from pretrain.export import load_image_encoder

    encoder = load_encoder({"source": "export", "path": str(assets["export"])})
    reference = load_image_encoder(assets["export"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encoder.features(x), reference.features(x))
        torch.testing.assert_close(encoder.embed(x), reference.embed(x))
        baseline = random_like(encoder, seed=5)
        assert baseline.num_features == encoder.num_features and not baseline.has_projection
        assert not torch.allclose(baseline.features(x), encoder.features(x))
        torch.testing.assert_close(random_like(encoder, seed=5).features(x), baseline.features(x))  # seeded
    # Normalisation comes from the export's config: an image at the mean colour becomes 0.
    mean = np.asarray(reference.data_config["mean"])
    image = np.broadcast_to(np.round(mean * 255).astype(np.uint8), (1, 32, 32, 3))
    assert encoder.preprocess(image).abs().max() < 0.02


def test_timm_source_loads_a_local_weight_file_strictly(assets, tmp_path):
    from safetensors.torch import save_file

    random = load_encoder({"source": "random", "arch": "vit_tiny_patch16_224", "kwargs": TINY_VIT}, seed=7)
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in random.backbone.state_dict().items()}, str(weights))
    loaded = load_encoder(
        {"source": "timm", "arch": "vit_tiny_patch16_224", "kwargs": TINY_VIT, "weights": str(weights)}
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), random.features(x))
    with pytest.raises(InputError, match=str(weights.name)):
        load_encoder(
            {
                "source": "timm",
                "arch": "vit_tiny_patch16_224",
                "kwargs": {**TINY_VIT, "depth": 2},
                "weights": str(weights),
            }
        )
    with pytest.raises(InputError, match="encoder.path"):
        load_encoder({"source": "export", "path": None})
    with pytest.raises(InputError, match="config.json"):
        load_encoder({"source": "export", "path": str(tmp_path)})
    with pytest.raises(InputError, match="encoder.source"):
        load_encoder({"source": "hub"})


# ---------------------------------------------------------------------------------------------
# Shards


def test_embed_shards_writes_every_sample_once_per_slide_with_coordinates(assets, tmp_path):
    encoder = load_encoder({"source": "export", "path": str(assets["export"])})
    files = embed_shards(encoder, assets["manifest"], tmp_path / "emb", batch_size=32, progress=False)
    assert set(files) == {"s1", "s2"}
    manifest = load_manifest(assets["manifest"])
    index = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    for slide, path in files.items():
        adata = read_embeddings(path)
        assert path == tmp_path / "emb" / f"{slide}.h5ad"
        assert adata.n_obs == manifest["slides"][slide]["n_samples"] == index["slides"][slide]["n"]
        assert adata.obs_names.is_unique and set(adata.obs["slide"]) == {slide}
        assert set(adata.obs["cell_id"]) == {f"{slide}-c{i:05d}" for i in range(adata.n_obs)}
        assert adata.X.shape == (adata.n_obs, encoder.num_features) and adata.X.dtype == np.float32
        assert {"x_um", "y_um", "he_x_px", "he_y_px", "patient", "cancer_type", "key"} <= set(adata.obs.columns)
        assert adata.uns["embedding"]["kind"] == "cells" and adata.uns["embedding"]["which"] == "backbone"
        # Where scanpy / squidpy look: obsm["spatial"] (µm) and the embedding under obsm.
        np.testing.assert_array_equal(adata.obsm["spatial"], adata.obs[["x_um", "y_um"]].to_numpy(float))
        np.testing.assert_array_equal(adata.obsm["X_emb"], adata.X)
    # Rows belong to their cells: re-embed two crops straight from the shards and compare.
    from finetune.embed import iter_shard_samples

    samples = {meta["cell_id"]: (meta, jpeg) for meta, jpeg in iter_shard_samples(manifest, progress=False)}
    adata = anndata.read_h5ad(files["s2"])
    for cell in adata.obs_names[[0, -1]]:
        meta, jpeg = samples[cell]
        expected = embed_images(encoder, [jpeg], progress=False)[0]
        np.testing.assert_allclose(adata[cell].X.ravel(), expected, rtol=1e-4, atol=1e-5)
        assert adata.obs.loc[cell, "x_um"] == pytest.approx(meta["x_um"])


def test_projected_embeddings_are_unit_vectors_and_need_a_projection(assets, tmp_path):
    encoder = load_encoder({"source": "export", "path": str(assets["export"])})
    files = embed_shards(encoder, assets["manifest"], tmp_path, which="projected", progress=False)
    x = anndata.read_h5ad(files["s1"]).X
    assert x.shape[1] == 16
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(InputError, match="projection"):
        embed_shards(random_like(encoder), assets["manifest"], tmp_path / "no", which="projected", progress=False)
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------------------------
# Whole-slide tiles


@pytest.fixture(scope="module")
def half_tissue_slide(tmp_path_factory) -> Path:
    """A 512 × 1024 px slide at 0.5 µm/px: textured tissue where x < 512 px, white glass to the right."""
    rng = np.random.default_rng(0)
    image = np.full((512, 1024, 3), 245, dtype=np.uint8)
    tissue = np.array([200, 110, 170]) + rng.normal(0, 25, size=(512, 512, 3))
    image[:, :512] = np.clip(tissue, 0, 255).astype(np.uint8)
    levels = [image, image.reshape(256, 2, 512, 2, 3).mean(axis=(1, 3)).astype(np.uint8)]
    path = tmp_path_factory.mktemp("slide") / "half.ome.tif"
    write_pyramidal_ome_tiff(
        path, image.shape[:2], 0.5, lambda level, shape: tiles_from_array(levels[level], 256), tile_px=256
    )
    return path


def test_tile_embeddings_cover_the_tissue_and_skip_glass(assets, half_tissue_slide, tmp_path):
    encoder = load_encoder({"source": "export", "path": str(assets["export"])})
    out = embed_slide_tiles(
        encoder,
        half_tissue_slide,
        tmp_path / "half.h5ad",
        tile_um_per_px=1.0,
        tile_px=32,
        min_tissue_fraction=0.5,
        batch_size=16,
        meta={"patient": "P9"},
        progress=False,
    )
    adata = read_embeddings(out)
    # Tiles cover 32 px × 1 µm/px = 32 µm = 64 level-0 px: a 8 × 16 grid, the left 8 × 8 on tissue.
    assert adata.uns["embedding"]["n_grid_tiles"] == 128
    assert adata.X.shape == (64, encoder.num_features)
    assert (adata.obs["tile_x0_px"] + adata.obs["tile_size_px"] <= 512 + 1e-6).all()
    assert set(zip(adata.obs["row"], adata.obs["col"])) == {(r, c) for r in range(8) for c in range(8)}
    np.testing.assert_allclose(adata.obs["x_um"], adata.obs["he_x_px"] * 0.5)
    np.testing.assert_allclose(adata.obs["he_x_px"], adata.obs["tile_x0_px"] + 32.0)
    assert set(adata.obs["patient"]) == {"P9"} and (adata.obs["tissue_fraction"] >= 0.5).all()

    # A tile's embedding is the encoder's output on that 64 px square read at level 1 (32 px).
    from data_shards.slide import Slide

    with Slide(half_tissue_slide) as slide:
        x0, y0 = int(adata.obs["tile_x0_px"].iloc[5]), int(adata.obs["tile_y0_px"].iloc[5])
        region = slide.read_region(x0 // 2, y0 // 2, 32, 32, level=1)
    np.testing.assert_allclose(adata.X[5], embed_images(encoder, [region], progress=False)[0], rtol=1e-4, atol=1e-5)


def test_run_embed_handles_shards_and_slides_from_one_config(assets, half_tissue_slide, tmp_path):
    cfg = OmegaConf.create(
        {
            "out_dir": str(tmp_path / "emb"),
            "encoder": {"source": "export", "path": str(assets["export"])},
            "shards": str(assets["manifest"]),
            "progress": False,
            "batch_size": 50,
            "slides": [{"path": str(half_tissue_slide), "id": "wsi", "meta": {"patient": "P9"}}],
            "tiles": {"um_per_px": 2.0, "size_px": 32},
        }
    )
    result = run_embed(cfg)
    assert set(result["files"]) == {"s1", "s2", "wsi"}
    assert result["n"]["s1"] == 130 and result["n"]["s2"] == 70 and 0 < result["n"]["wsi"] <= 32
    assert (tmp_path / "emb" / "embed_config.yaml").is_file()
    with pytest.raises(InputError, match="slides"):
        run_embed(OmegaConf.merge(cfg, {"slides": [{"path": str(tmp_path / "missing.svs")}]}))
    with pytest.raises(InputError, match="which"):
        run_embed(OmegaConf.merge(cfg, {"which": "cls"}))


def test_many_slides_continue_where_they_stopped_and_split_over_processes(assets, half_tissue_slide, tmp_path):
    slides = [{"path": str(half_tissue_slide), "id": f"wsi{i}"} for i in range(3)]
    cfg = OmegaConf.create(
        {
            "out_dir": str(tmp_path / "emb"),
            "encoder": {"source": "export", "path": str(assets["export"])},
            "progress": False,
            "slides": slides,
            "tiles": {"um_per_px": 2.0, "size_px": 32},
        }
    )
    # Two processes, as on two GPUs: disjoint slides, one shared index.
    first = run_embed(OmegaConf.merge(cfg, {"part": "0/2"}))
    second = run_embed(OmegaConf.merge(cfg, {"part": "1/2"}))
    assert set(first["files"]) == {"wsi0", "wsi2"} and set(second["files"]) == {"wsi1"}
    index = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    assert set(index["slides"]) == {"wsi0", "wsi1", "wsi2"}
    # A rerun skips what is done with the same settings (files untouched) ...
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("*.h5ad")}
    again = run_embed(cfg)
    assert sorted(again["skipped"]) == ["wsi0", "wsi1", "wsi2"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("*.h5ad")} == stamps
    # ... and embeds again when a setting changed, or when a file is damaged.
    (tmp_path / "emb" / "wsi1.h5ad").write_bytes(b"cut short")
    changed = run_embed(OmegaConf.merge(cfg, {"slides": slides[:2], "tiles": {"size_px": 16}}))
    assert changed["skipped"] == [] and read_embeddings(changed["files"]["wsi1"]).uns["embedding"]["tile_px"] == 16
    with pytest.raises(InputError, match="part"):
        run_embed(OmegaConf.merge(cfg, {"part": "2/2"}))


def test_decode_jpeg_round_trip_of_a_shard_crop(assets):
    from finetune.embed import iter_shard_samples

    meta, jpeg = next(iter_shard_samples(load_manifest(assets["manifest"]), progress=False))
    image = decode_jpeg(jpeg)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and "cell_id" in meta and "key" in meta

"""From registered Xenium bundles to webdataset shards: the `make_shards` stage.

Per slide: read the bundle, load (or fit) its registration, QC the cells, rank-tokenize them,
find their spatial neighbours, cut a crop at every cell while visiting the slide in spatial
order, and write shuffled shards. Everything a slide writes goes into one temporary folder that
is renamed to ``<shard_dir>/<slide_id>/`` only when complete, so a crash mid-slide leaves nothing
that a reader would pick up, and a re-run skips slides already done. ``manifest.json`` at the top
is merged from the completed slides' manifests (also after a SLURM array job).

Config: :class:`data_shards.schema.DataConfig` (every key, its default and what it does)::

    out_dir: shard folder
    slides: [{id, bundle, he_slide (relative to bundle), registration (json path or null), meta {}}]
    vocab: "panel" (build from the bundles' genes) or a path (gene list / Nicheformer model.h5ad)
    tech_mean: "compute" (from the training cells, saved as tech_mean.npy), a .npy path, or null
    matrix / min_qv: how counts are read (see data_shards.xenium.read_xenium)
    tokens, neighbours, crop, qc, shards, register: see the schema
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_dir, write_json
from common.config import apply_schema, save_config
from common.errors import InputError
from common.logs import setup_logging

from .crops import CropReader
from .manifest import SLIDE_MANIFEST_NAME, merge_manifests
from .neighbours import find_neighbours, neighbour_sample
from .qc import apply_filters, on_tissue, tissue_mask
from .register import Registration, check_bundle_identity, register_bundle
from .sample import encode_jpeg, encode_sample
from .schema import DataConfig, slide_register_config
from .slide import Slide
from .tokenize import compute_tech_mean, load_tech_mean, rank_tokens_with_report, save_tech_mean
from .vocabulary import Vocabulary
from .writer import ShuffledShardWriter, plan_shards
from .xenium import CELLS_FILES, check_bundle, read_xenium

log = logging.getLogger(__name__)


def _input_fingerprint(slide: dict) -> list:
    """Size and modification time of the slide's input files: a rewritten bundle is sharded again."""
    bundle = Path(slide["bundle"])
    paths = [bundle / name for name in (*CELLS_FILES, "cell_feature_matrix.h5", "transcripts.parquet")]
    paths.append(bundle / slide.get("he_slide", "he/post_xenium_he.ome.tif"))
    if slide.get("registration"):
        paths.append(Path(slide["registration"]))
    return [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in paths if path.is_file()]


def slide_config_hash(cfg: DictConfig, slide: DictConfig, vocab_sha: str) -> str:
    """What decides a slide's samples: re-running with the same hash may skip the slide."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    relevant = {
        k: resolved.get(k) for k in ("matrix", "min_qv", "tokens", "neighbours", "crop", "qc", "shards", "register")
    }
    # How the shuffle is staged (memory or spill) and how many threads encode do not change a byte of the shards.
    staging = ("memory_budget_mb", "encode_threads")
    relevant["shards"] = {k: v for k, v in (relevant["shards"] or {}).items() if k not in staging}
    relevant["slide"] = OmegaConf.to_container(slide, resolve=True) if isinstance(slide, DictConfig) else slide
    relevant["inputs"] = _input_fingerprint(relevant["slide"])
    relevant["vocab_sha256"] = vocab_sha
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def offsets_in_crop_frame(neighbours, he_px: np.ndarray, he_um_per_px: float) -> np.ndarray:
    """Neighbour offsets in µm along the H&E image axes (x right, y down), neighbour minus centre.

    Neighbours are found in Xenium µm, but the crop is cut from the H&E, which the registration
    rotates (and locally deforms) relative to Xenium. Expressing offsets in the crop's frame keeps
    the neighbourhood aligned with the image, so a flip or 90° rotation of the crop applies to both.
    he_px: (n, 2) registered centres in H&E level-0 px. Returns (n, k, 2) float32, NaN where missing.
    """
    indices = neighbours.indices  # (n, k), -1 where missing
    missing = indices < 0
    offsets = (he_px[np.where(missing, 0, indices)] - he_px[:, None, :]) * he_um_per_px  # (n, k, 2) µm
    offsets[missing] = np.nan
    return offsets.astype(np.float32)


def check_output_folder(path: str | Path, field: str = "out_dir") -> Path:
    """``path`` as a Path, once it is a folder or can be made one; nothing is created here.

    A file at ``path`` or at one of its parents would otherwise surface as a raw
    NotADirectoryError / FileExistsError from the first write, after inputs were read.
    """
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        if folder.exists() or folder.is_symlink():
            raise InputError(path, field, "a folder, or a path where one can be made", f"a file at {folder}")
    return path


def _preflight_slide(slide: DictConfig, cfg: DictConfig, scratch: Path, fit: bool = True) -> Path | None:
    """Check that every input of one slide opens, before the build writes anything.

    The bundle's files (:func:`data_shards.xenium.check_bundle`), the H&E slide, and the
    registration: a saved one loads and passes its checks; otherwise it is fitted (and checked)
    into ``scratch/registration`` when ``fit``, and that folder is returned for ``shard_slide``
    to reuse instead of fitting again.
    """
    bundle = check_bundle(slide.bundle, matrix=cfg.matrix)
    with _open_he_slide(bundle, slide):
        pass
    if not slide.get("registration") and not fit:
        return None
    _registration_for(slide, cfg, bundle, scratch)
    return None if slide.get("registration") else scratch / "registration"


def _open_he_slide(bundle: Path, slide: DictConfig) -> Slide:
    """The slide's H&E image, opened the same way by the input check, the registration and the sharding
    (with the slide entry's ``he_um_per_px`` override, for slides whose metadata lacks or misstates it)."""
    return Slide(bundle / slide.get("he_slide", "he/post_xenium_he.ome.tif"), um_per_px=slide.get("he_um_per_px"))


def _registration_from_folder(folder: Path) -> tuple[Registration, dict]:
    """A registration fitted by ``_preflight_slide`` and its quality report."""
    report_path = folder / "registration_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return Registration.from_json(folder / "registration.json"), report


def _check_slide_entry(slide: DictConfig, index: int) -> None:
    for key in ("id", "bundle"):
        if not slide.get(key):
            raise InputError(None, f"slides[{index}].{key}", "a value", None)
    if any(c in str(slide.id) for c in "./\\ "):
        raise InputError(
            None,
            f"slides[{index}].id",
            "a slide id without '.', '/', '\\' or spaces (it names files and sample keys)",
            slide.id,
        )


def _registration_for(slide: DictConfig, cfg: DictConfig, bundle: Path, stage_dir: Path) -> tuple[Registration, dict]:
    """The slide's saved registration, or a fresh fit (its report and overlay kept in the slide folder)."""
    if slide.get("registration"):
        path = Path(slide.registration)
        if not path.is_file():
            raise InputError(
                path,
                f"slides[{slide.id}].registration",
                "a registration saved by `make_shards.py register`",
                "no such file",
            )
        registration = Registration.from_json(path)
        check_bundle_identity(registration.identity, bundle, path)  # not another bundle's registration.json
        report_path = path.with_name("registration_report.json")
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        return registration, report
    report = register_bundle(bundle, stage_dir / "registration", slide_register_config(cfg.register, slide))
    return Registration.from_json(stage_dir / "registration" / "registration.json"), report


def _qc(adata, he_px: np.ndarray, slide_image: Slide, qc_cfg: DictConfig) -> Any:
    obs = adata.obs
    checks: dict[str, np.ndarray] = {}
    checks["min_transcripts"] = obs["transcript_counts"].to_numpy() >= qc_cfg.min_transcripts
    checks["min_genes"] = np.diff(adata.X.indptr) >= qc_cfg.min_genes
    if qc_cfg.require_nucleus and "nucleus_area" in obs:
        checks["nucleus_present"] = np.nan_to_num(obs["nucleus_area"].to_numpy(dtype=float)) > 0
    if qc_cfg.on_tissue:
        thumb, downsample = slide_image.thumbnail(int(qc_cfg.tissue_thumbnail_px))
        checks["on_tissue"] = on_tissue(he_px, tissue_mask(thumb), downsample)
    return apply_filters(adata.n_obs, checks)


def _sample_meta(
    slide_id: str,
    cell_id: str,
    xy_um: np.ndarray,
    he_px: np.ndarray,
    obs_row: dict,
    n_genes: int,
    n_neighbours: int,
    region: int,
    crop_um_per_px: float,
    meta: dict,
) -> dict:
    out = {
        "cell_id": cell_id,
        "slide": slide_id,
        "x_um": round(float(xy_um[0]), 3),
        "y_um": round(float(xy_um[1]), 3),
        "he_x_px": round(float(he_px[0]), 3),
        "he_y_px": round(float(he_px[1]), 3),
        "crop_um_per_px": crop_um_per_px,
        "registration_region": int(region),
        "n_genes": int(n_genes),
        "n_neighbours": int(n_neighbours),
    }
    for key, value in obs_row.items():
        if isinstance(value, (np.floating, float)) and not math.isfinite(value):
            value = None
        out[key] = value.item() if hasattr(value, "item") else value
    out.update(meta)
    return out


def encode_threads(cfg: DictConfig) -> int:
    """JPEG-encoding threads per slide process: ``shards.encode_threads``, else the cores left per worker."""
    cfg = apply_schema(DataConfig, cfg)
    if cfg.shards.encode_threads:
        return max(1, int(cfg.shards.encode_threads))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(cfg.workers)))


def encoded_crops(
    crops: Iterator[tuple[int, np.ndarray]], quality: int, threads: int, spent: dict[str, float]
) -> Iterator[tuple[int, bytes]]:
    """(cell index, JPEG bytes) in the order of ``crops``, encoded in ``threads`` threads.

    imagecodecs' encoder releases the GIL, so while the threads encode, the caller assembles and
    writes earlier samples. ``spent["encode_jpeg"]`` gets the time the caller waited for encodings
    (with one thread: the encoding time itself).
    """
    if threads <= 1:
        for j, crop in crops:
            t0 = time.perf_counter()
            jpg = encode_jpeg(crop, quality)
            spent["encode_jpeg"] += time.perf_counter() - t0
            yield j, jpg
        return
    pending: deque = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="jpeg") as pool:
        for j, crop in crops:
            # A copy: the crop reader reuses its block and carry buffers once the next block is read.
            pending.append((j, pool.submit(encode_jpeg, np.array(crop), quality)))
            if len(pending) >= 8 * threads:
                j0, future = pending.popleft()
                t0 = time.perf_counter()
                jpg = future.result()
                spent["encode_jpeg"] += time.perf_counter() - t0
                yield j0, jpg
        while pending:
            j0, future = pending.popleft()
            t0 = time.perf_counter()
            jpg = future.result()
            spent["encode_jpeg"] += time.perf_counter() - t0
            yield j0, jpg


def shard_slide(
    slide: DictConfig,
    cfg: DictConfig,
    vocab: Vocabulary,
    tech_mean: np.ndarray | None,
    shard_dir: Path,
    fitted_registration: Path | None = None,
) -> dict:
    """Write ``shard_dir/<slide.id>/`` (shards, slide manifest, QC and registration reports).

    ``fitted_registration``: a folder the build's input check already fitted this slide's
    registration into; it is copied into the slide folder instead of fitting again.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - clock, 3)
        clock = now

    slide_id = str(slide.id)
    bundle = Path(slide.bundle)
    final_dir = shard_dir / slide_id
    with atomic_dir(final_dir) as stage:
        adata = read_xenium(bundle, matrix=cfg.matrix, min_qv=cfg.min_qv)
        lap("read")
        if fitted_registration is not None:
            shutil.copytree(fitted_registration, stage / "registration")
            registration, registration_report = _registration_from_folder(stage / "registration")
        else:
            registration, registration_report = _registration_for(slide, cfg, bundle, stage)
        xy_um = adata.obsm["spatial"].astype(np.float64)  # (n_cells, 2) µm
        he_px = registration.map(xy_um)  # (n_cells, 2) H&E level-0 px
        regions = registration.region_of(xy_um)
        lap("register")
        with _open_he_slide(bundle, slide) as image:
            qc = _qc(adata, he_px, image, cfg.qc)
            keep = np.flatnonzero(qc.keep)
            if len(keep) == 0:
                raise InputError(bundle, "cells", "at least one cell passing QC", qc.summary())
            cells = adata[keep]
            lap("qc")
            tokens, token_report = rank_tokens_with_report(
                cells,
                vocab,
                tech_mean,
                cfg.tokens.context_length,
                cfg.tokens.assay,
                cfg.tokens.modality,
                cfg.tokens.organism,
            )
            lap("tokenize")
            kept_xy, kept_px = xy_um[keep], he_px[keep]
            neighbours = find_neighbours(kept_xy, k=cfg.neighbours.k, radius_um=cfg.neighbours.radius_um, path=bundle)
            neighbours = neighbours._replace(offsets_um=offsets_in_crop_frame(neighbours, kept_px, image.um_per_px))
            plan = plan_shards(
                kept_xy, cfg.shards.samples_per_shard, seed=int(cfg.shards.seed), group_um=cfg.shards.group_um
            )
            lap("neighbours")
            reader = CropReader.from_config(image, cfg.crop, progress=bool(cfg.progress))
            crop_um_per_px = float(cfg.crop.target_um_per_px or image.um_per_px)
            obs_columns = [c for c in ("transcript_counts", "cell_area", "nucleus_area") if c in cells.obs]
            # Per-cell values as Python lists: indexing a list is cheaper than a numpy scalar per cell,
            # and tolist() gives the same Python numbers as the scalars' .item(), so the json is unchanged.
            obs_values = {c: cells.obs[c].to_numpy().tolist() for c in obs_columns}
            n_genes = np.diff(cells.X.indptr).tolist()
            cell_ids = [str(cell_id) for cell_id in cells.obs_names]
            xy_list, px_list, region_list = kept_xy.tolist(), kept_px.tolist(), regions[keep].tolist()
            meta = slide.get("meta") or {}
            meta = OmegaConf.to_container(meta, resolve=True) if isinstance(meta, DictConfig) else dict(meta)
            writer = ShuffledShardWriter(
                stage,
                slide_id,
                plan,
                seed=int(cfg.shards.seed),
                memory_budget_bytes=int(cfg.shards.memory_budget_mb) << 20,
            )
            # Split of the crop loop's time: waiting for JPEG encodings, sample assembly, spilling to
            # the writer; what remains of the loop is reading and cropping the slide.
            spent = {"encode_jpeg": 0.0, "assemble_sample": 0.0, "spill": 0.0}
            threads = encode_threads(cfg)
            crops = reader.iter_crops(kept_px)
            try:
                for j, jpg in encoded_crops(crops, int(cfg.shards.jpeg_quality), threads, spent):
                    t1 = time.perf_counter()
                    nbr_tokens, nbr_offsets = neighbour_sample(j, tokens, neighbours)
                    sample_meta = _sample_meta(
                        slide_id,
                        cell_ids[j],
                        xy_list[j],
                        px_list[j],
                        {c: v[j] for c, v in obs_values.items()},
                        n_genes[j],
                        len(nbr_tokens),
                        region_list[j],
                        crop_um_per_px,
                        meta,
                    )
                    sample = encode_sample(f"{slide_id}_{j:08d}", jpg, tokens[j], nbr_tokens, nbr_offsets, sample_meta)
                    t2 = time.perf_counter()
                    writer.add(j, sample)
                    spent["assemble_sample"] += t2 - t1
                    spent["spill"] += time.perf_counter() - t2
                lap("crop_loop")
                timings["read_and_crop"] = round(timings.pop("crop_loop") - sum(spent.values()), 3)
                timings.update({k: round(v, 3) for k, v in spent.items()})
                log.info(
                    "slide %s: samples %s, JPEG encoded in %d thread(s)",
                    slide_id,
                    "shuffled in memory" if writer.in_memory else "spilled to disk",
                    threads,
                )
                shards = writer.finish()
            except BaseException:
                writer.discard()
                raise
            lap("write_shards")
        slide_manifest = {
            "slide": slide_id,
            "bundle": str(bundle),
            "config_hash": slide_config_hash(cfg, slide, vocab.sha256()),
            "vocabulary_sha256": vocab.sha256(),
            "n_samples": sum(s["n_samples"] for s in shards),
            "shards": shards,
            "meta": meta,
            "qc": qc.summary(),
            "crops": reader.stats.as_dict(),
            "tokenize": {
                k: v for k, v in token_report.to_dict().items() if k not in ("unmatched_genes", "merged_genes")
            }
            | {"unmatched_genes_head": token_report.unmatched_genes[:20]},
            "registration": {k: registration_report.get(k) for k in ("overall", "regions") if k in registration_report},
            "he_um_per_px": image.um_per_px,
            "timings_s": timings,
        }
        write_json(stage / SLIDE_MANIFEST_NAME, slide_manifest)
    n = slide_manifest["n_samples"]
    total = sum(timings.values())
    log.info(
        "slide %s: %d samples in %d shards, %.1f s (%.0f cells/s)",
        slide_id,
        n,
        len(shards),
        total,
        n / max(total, 1e-9),
    )
    return slide_manifest


def _slide_done(shard_dir: Path, slide: DictConfig, cfg: DictConfig, vocab_sha: str) -> bool:
    path = shard_dir / str(slide.id) / SLIDE_MANIFEST_NAME
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("config_hash") == slide_config_hash(cfg, slide, vocab_sha)


def _panel_vocabulary(cfg: DictConfig) -> Vocabulary:
    """Union of the bundles' gene panels, in order of first appearance (Ensembl id where known)."""
    ids: list[str] = []
    symbols: list[str] = []
    seen: set[str] = set()
    for slide in cfg.slides:
        adata = read_xenium(slide.bundle, matrix=cfg.matrix, min_qv=cfg.min_qv)
        gene_ids = adata.var["gene_ids"].astype(str).tolist() if "gene_ids" in adata.var else [""] * adata.n_vars
        for gene_id, symbol in zip(gene_ids, adata.var_names):
            key = gene_id or symbol
            if key not in seen:
                seen.add(key)
                ids.append(key)
                symbols.append(symbol)
    return Vocabulary.from_genes(ids, symbols, source="panel")


def compute_vocabulary(cfg: DictConfig) -> tuple[Vocabulary, np.ndarray | None, dict, dict | None]:
    """The vocabulary and technology mean every slide is tokenized with, in memory (nothing written).

    Returns (vocab, tech_mean, vocab_info, mean_info); :func:`save_vocabulary` writes them.
    """
    vocab = _panel_vocabulary(cfg) if cfg.vocab == "panel" else Vocabulary.from_file(cfg.vocab)
    vocab_info = {"path": "vocab.tsv", "sha256": vocab.sha256(), "size": len(vocab), "source": str(cfg.vocab)}
    tech_mean = None
    mean_info = None
    if cfg.tech_mean == "compute":
        # The non-zero mean pools the cells of all slides; slides are read one at a time.
        slides = (read_xenium(slide.bundle, matrix=cfg.matrix, min_qv=cfg.min_qv) for slide in cfg.slides)
        tech_mean = compute_tech_mean(slides, vocab)
        mean_info = {"path": "tech_mean.npy", "source": "computed from the training cells"}
    elif cfg.tech_mean:
        tech_mean = load_tech_mean(cfg.tech_mean, vocab)
        mean_info = {"path": "tech_mean.npy", "source": str(cfg.tech_mean)}
    return vocab, tech_mean, vocab_info, mean_info


def save_vocabulary(shard_dir: Path, vocab: Vocabulary, tech_mean: np.ndarray | None) -> None:
    """Write ``vocab.tsv`` (and ``tech_mean.npy`` when there is one) beside the shards, each atomically."""
    vocab.save(shard_dir / "vocab.tsv")
    if tech_mean is not None:
        save_tech_mean(shard_dir / "tech_mean.npy", tech_mean)


def prepare_vocabulary(cfg: DictConfig, shard_dir: Path) -> tuple[Vocabulary, np.ndarray | None, dict, dict | None]:
    """The vocabulary and technology mean every slide is tokenized with, saved beside the shards."""
    vocab, tech_mean, vocab_info, mean_info = compute_vocabulary(cfg)
    save_vocabulary(shard_dir, vocab, tech_mean)
    return vocab, tech_mean, vocab_info, mean_info


def load_prepared(shard_dir: Path) -> tuple[Vocabulary, np.ndarray | None, dict, dict | None]:
    """The vocabulary and technology mean that ``prepare`` saved (for array tasks and merging)."""
    vocab_path = shard_dir / "vocab.tsv"
    if not vocab_path.is_file():
        raise InputError(vocab_path, None, "the vocabulary written by `make_shards.py prepare`", "no such file")
    vocab = Vocabulary.from_file(vocab_path)
    vocab_info = {"path": vocab_path.name, "sha256": vocab.sha256(), "size": len(vocab)}
    mean_path = shard_dir / "tech_mean.npy"
    if mean_path.is_file():
        return vocab, load_tech_mean(mean_path, vocab), vocab_info, {"path": mean_path.name}
    return vocab, None, vocab_info, None


def merge(cfg: DictConfig) -> dict:
    """Build manifest.json from the completed slides (the last step of a SLURM array job)."""
    cfg = apply_schema(DataConfig, cfg)
    shard_dir = Path(cfg.out_dir)
    _, _, vocab_info, mean_info = load_prepared(shard_dir)
    return merge_manifests(shard_dir, vocab_info, OmegaConf.to_container(cfg, resolve=True), mean_info)


def prepare(cfg: DictConfig) -> dict:
    """Write the shared vocabulary and technology mean (before a SLURM array job).

    Every slide's bundle, H&E slide and saved registration are checked first (registrations
    are fitted by the array tasks), so a bad input stops the job before anything is written.
    """
    cfg = apply_schema(DataConfig, cfg)
    for i, slide in enumerate(cfg.slides):
        _check_slide_entry(slide, i)
    shard_dir = check_output_folder(cfg.out_dir)
    vocab, tech_mean, vocab_info, mean_info = compute_vocabulary(cfg)
    with tempfile.TemporaryDirectory(prefix="make_shards_inputs_") as scratch:
        for slide in cfg.slides:
            _preflight_slide(slide, cfg, Path(scratch) / str(slide.id), fit=False)
    shard_dir.mkdir(parents=True, exist_ok=True)
    save_vocabulary(shard_dir, vocab, tech_mean)
    return {"vocabulary": vocab_info, "tech_mean": mean_info}


def _shard_slide_job(args: tuple) -> dict:
    slide, cfg, vocab_path, tech_mean, shard_dir, fitted = args
    setup_logging()
    slide, cfg = OmegaConf.create(slide), OmegaConf.create(cfg)
    fitted = None if fitted is None else Path(fitted)
    return shard_slide(slide, cfg, Vocabulary.from_file(vocab_path), tech_mean, Path(shard_dir), fitted)


def build_shards(cfg: DictConfig) -> dict | None:
    """Shard every configured slide (skipping completed ones) and merge the manifest.

    Inputs are checked before anything is written: the output folder can be made, the
    vocabulary and technology mean are computed in memory, and every slide to shard has its
    bundle, H&E slide and registration checked (registrations are fitted here, once, and
    reused). Only then are the config copy, ``vocab.tsv`` and ``tech_mean.npy`` written.
    """
    cfg = apply_schema(DataConfig, cfg)
    if not cfg.slides:
        raise InputError(None, "slides", "at least one slide entry {id, bundle, ...}", "none")
    for i, slide in enumerate(cfg.slides):
        _check_slide_entry(slide, i)
    shard_dir = check_output_folder(cfg.out_dir)
    if cfg.only_slides is not None:
        # An array task: every task must tokenize with the same prepared vocabulary and mean.
        vocab, tech_mean, vocab_info, mean_info = load_prepared(shard_dir)
    else:
        vocab, tech_mean, vocab_info, mean_info = compute_vocabulary(cfg)

    wanted = [s for s in cfg.slides if cfg.only_slides is None or str(s.id) in {str(x) for x in cfg.only_slides}]
    todo = [s for s in wanted if not _slide_done(shard_dir, s, cfg, vocab.sha256())]
    for s in wanted:
        if s not in todo:
            log.info("slide %s already sharded with this config: skipped", s.id)

    with tempfile.TemporaryDirectory(prefix="make_shards_inputs_") as scratch:
        fitted = [_preflight_slide(s, cfg, Path(scratch) / str(s.id)) for s in todo]
        # Every input passed: from here on the build writes.
        shard_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, shard_dir / "make_shards_config.yaml")
        if cfg.only_slides is None:
            save_vocabulary(shard_dir, vocab, tech_mean)
        for stale in shard_dir.glob(".*.partial"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crashed run; never read

        jobs = [
            (
                OmegaConf.to_container(s, resolve=True),
                OmegaConf.to_container(cfg, resolve=True),
                str(shard_dir / vocab_info["path"]),
                tech_mean,
                str(shard_dir),
                None if folder is None else str(folder),
            )
            for s, folder in zip(todo, fitted)
        ]
        if int(cfg.workers) > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=int(cfg.workers)) as pool:
                list(pool.map(_shard_slide_job, jobs))
        else:
            for slide, folder in zip(todo, fitted):
                shard_slide(slide, cfg, vocab, tech_mean, shard_dir, folder)
    if not cfg.merge:
        return None
    return merge_manifests(shard_dir, vocab_info, OmegaConf.to_container(cfg, resolve=True), mean_info)

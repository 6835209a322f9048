"""Survival prediction with MCAT on PAST embeddings: cross-validation, metrics, Kaplan–Meier.

`run_survival(cfg)` is the whole task (called by `launch/finetune.py survival --config ...`; settings:
:class:`finetune.survival.config.SurvivalConfig`):

1. the cohort: a clinical CSV + signatures CSV + per-slide patch embeddings (+ optional
   per-patient mean cell embeddings), or, with `cohort.synthetic=true`, a synthetic cohort made
   by `finetune.synthetic.cohort.make_cohort` (optionally on top of real patch embeddings);
2. 5-fold cross-validation by patient (stratified on event status); in each fold the hazard
   bins are cut at the quartiles of the training patients' uncensored times and the omic
   (and cell) features are standardised with training statistics only;
3. each mode in `modes` — `pathology` (AMIL), `genomic` (SNN), `mcat`, `past_multi` (MCAT +
   the mean cell embedding token) — trained with Adam and the discrete-time NLL loss, for each
   image encoder in `data.image_embeddings` (a folder, or {encoder name: folder} to compare
   encoders as the PAST paper did: embeddings from any export or any timm model, made by
   `finetune.embed`);
4. Harrell's and Uno's C-index per fold and mean ± sd (printed), out-of-fold risks, and
   Kaplan–Meier curves of the high/low-risk groups with the log-rank p-value (PNG). A test
   patient is high-risk when their risk exceeds the median risk of that fold's training
   patients, so the threshold never sees the test fold and risks from different folds never
   need a common scale.

Outputs in `out_dir`: `config.yaml`, `fold_metrics.csv`, `summary.csv`, `metrics.json`,
`oof_risks.csv`, `paired_gains.csv` (fold-by-fold C-index gain of MCAT over each single modality and of
PAST-multi over MCAT), `kaplan_meier.png`, each written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from common.atomic import atomic_path
from common.config import apply_schema, save_config
from common.errors import InputError, read_json_file
from pretrain.export import load_cell_encoder

from ..controls import difference, gate, interval, spatial_blocks, verdict
from ..embed import embed_cells, embed_slide_tiles, read_embeddings
from ..encoders import load_encoder, random_like, resolve_device
from ..report import write_metrics
from ..synthetic.cohort import cells_in_tiles, make_cohort, make_shared_cohort, tile_states
from ..training import torch_threads
from .config import SurvivalConfig
from .data import Cohort, load_bags, patient_folds, read_cell_embeddings, read_clinical, read_signatures
from .evaluate import DISPLAY_NAMES, format_summary, logrank_p, paired_gains, plot_kaplan_meier, summary_table
from .reference import c_index_replicates, mean_bags, ridge_cox_cv
from .train import MODE_NAMES, cross_validate

log = logging.getLogger(__name__)


def _image_sources(data_cfg: Mapping[str, Any]) -> dict[str, str]:
    sources = data_cfg.get("image_embeddings")
    if sources is None:
        return {}
    if isinstance(sources, (str, Path)):
        return {Path(sources).parent.name or "image": str(sources)}
    return {str(k): str(v) for k, v in dict(sources).items()}


def embed_with_encoders(cfg: DictConfig, slides: Mapping[str, str], out_folder: Path) -> dict[str, str]:
    """Embed the tissue tiles of `slides` ({slide_id: path}) with every encoder of `cfg.encoders`.

    Writes `<out_folder>/<encoder name>/<slide_id>.h5ad` (finetune.embed's format) and returns
    {encoder name: folder}.
    """
    for slide_id, path in slides.items():
        if not Path(path).is_file():
            raise InputError(path, f"slide {slide_id}", "an existing whole-slide image", "no such file")
    folders = {}
    encoders = {
        str(name): load_encoder(
            OmegaConf.to_container(encoder_cfg, resolve=True), seed=int(cfg.seed), device=cfg.train.device
        )
        for name, encoder_cfg in cfg.encoders.items()
    }
    if cfg.baseline == "random" and encoders and "random" not in encoders:
        # The negative control: the first encoder's architecture with random weights, on the same tiles.
        encoders["random"] = random_like(next(iter(encoders.values())), seed=int(cfg.seed) + 1)
    for name, encoder in encoders.items():
        folder = out_folder / str(name)
        for slide_id, path in slides.items():
            embed_slide_tiles(
                encoder,
                path,
                folder / f"{slide_id}.h5ad",
                tile_um_per_px=float(cfg.tiles.um_per_px),
                tile_px=int(cfg.tiles.size_px),
                min_tissue_fraction=float(cfg.tiles.min_tissue_fraction),
                batch_size=int(cfg.tiles.batch_size),
                which=str(cfg.tiles.which),
                slide_id=str(slide_id),
                progress=bool(cfg.progress),
            )
        folders[str(name)] = str(folder)
    return folders


def embed_base_cells(base_cells: DictConfig, out_folder: Path, device: str, progress: bool) -> str:
    """Embed the cells of a shard manifest with an exported PAST cell encoder; the folder of per-slide files."""
    for key in ("manifest", "cell_encoder"):
        if not Path(base_cells[key]).exists():
            raise InputError(base_cells[key], f"cohort.base_cells.{key}", "an existing path", "no such file")
    encoder = load_cell_encoder(base_cells.cell_encoder, device=resolve_device(device))
    embed_cells(encoder, base_cells.manifest, out_folder, int(base_cells.batch_size), str(base_cells.which), progress)
    return str(out_folder)


def _prepare_synthetic(cfg: DictConfig, out_dir: Path) -> None:
    """Make the synthetic cohort, once per image encoder when a base slide is embedded by several."""
    c = cfg.cohort
    cohort_dir = Path(c.out_dir) if c.out_dir else out_dir / "cohort"
    if c.base_slide and cfg.encoders:
        bases = embed_with_encoders(cfg, {"base": c.base_slide}, out_dir / "base_tiles")
    else:
        bases = {str(c.encoder_name): c.base_embeddings}
    base_cells = c.base_cell_embeddings
    if c.base_cells.manifest and c.base_cells.cell_encoder:
        base_cells = embed_base_cells(c.base_cells, out_dir / "base_cells", cfg.train.device, bool(cfg.progress))
    if c.states_from and c.base_slide and cfg.encoders:
        _prepare_shared(cfg, cohort_dir, bases, base_cells)
        return
    made = {
        name: make_cohort(
            cohort_dir / name,
            n_patients=int(c.n_patients),
            embedding_dim=int(c.embedding_dim),
            cell_dim=int(c.cell_dim),
            seed=int(cfg.seed),
            image_effect=float(c.image_effect),
            genomic_effect=float(c.genomic_effect),
            cell_effect=float(c.cell_effect),
            censoring_fraction=float(c.censoring_fraction),
            base_embeddings=base,
            base_cell_embeddings=base_cells,
        )
        for name, base in bases.items()
    }
    first = next(iter(made.values()))  # the clinical tables are identical across encoders (one RNG stream)
    cfg.data.clinical_csv = str(first["clinical_csv"])
    cfg.data.signatures_csv = str(first["signatures_csv"])
    cfg.data.image_embeddings = {name: str(m["embeddings_dir"]) for name, m in made.items()}
    cfg.data.cell_embeddings = str(first["cell_embeddings"])


def _prepare_shared(cfg: DictConfig, cohort_dir: Path, bases: Mapping[str, str], base_cells: str | None) -> None:
    """One cohort for every encoder from the base slide's tiles and their planted cell-state shares."""
    c = cfg.cohort
    truth_path = Path(c.states_from) / "ground_truth_cells.parquet"
    if not truth_path.is_file():
        raise InputError(truth_path, "cohort.states_from", "a bundle with planted cell types", "no such file")
    truth = pd.read_parquet(truth_path)
    tables = {name: read_embeddings(Path(folder) / "base.h5ad") for name, folder in bases.items()}
    first = next(iter(tables.values()))
    for name, table in tables.items():
        if list(table.obs_names) != list(first.obs_names):
            raise InputError(Path(bases[name]) / "base.h5ad", "obs_names", "the same tiles for every encoder", name)
    tiles = first.obs[["tile_x0_px", "tile_y0_px", "tile_size_px"]].astype(float)
    state = tile_states(tiles, truth[["he_x_px", "he_y_px"]].to_numpy(float), truth["cell_type"], c.risk_cell_types)
    per_tile_cells = None
    if base_cells:
        cells = [read_embeddings(p) for p in sorted(Path(base_cells).glob("*.h5ad"))]
        xy = np.concatenate([a.obs[["he_x_px", "he_y_px"]].to_numpy(float) for a in cells])
        emb = np.concatenate([np.asarray(a.X) for a in cells])
        where = cells_in_tiles(tiles, xy)
        per_tile_cells = [emb[where == t] for t in range(len(tiles))]
    # Sites = spatial blocks of the slide, one per fold: test patients' tissue is tissue no training patient had.
    centres = tiles[["tile_x0_px", "tile_y0_px"]].to_numpy(float) + tiles[["tile_size_px"]].to_numpy(float) / 2
    sites = spatial_blocks(centres, np.zeros(len(tiles)), int(cfg.train.n_folds), seed=int(cfg.seed))
    made = make_shared_cohort(
        cohort_dir,
        {name: np.asarray(table.X) for name, table in tables.items()},
        state,
        tile_cell_embeddings=per_tile_cells,
        tile_sites=sites,
        n_patients=int(c.n_patients),
        seed=int(cfg.seed),
        image_effect=float(c.image_effect),
        genomic_effect=float(c.genomic_effect),
        cell_effect=float(c.cell_effect),
        tilt=float(c.tilt),
        censoring_fraction=float(c.censoring_fraction),
    )
    log.info(
        "shared cohort: tile state = share of %s cells (mean %.2f, sd %.2f over %d tiles)",
        "/".join(c.risk_cell_types),
        state.mean(),
        state.std(),
        len(state),
    )
    cfg.data.clinical_csv = str(made["clinical_csv"])
    cfg.data.signatures_csv = str(made["signatures_csv"])
    cfg.data.image_embeddings = {name: str(folder) for name, folder in made["embeddings_dirs"].items()}
    cfg.data.cell_embeddings = str(made["cell_embeddings"])


def run_survival(cfg: DictConfig | Mapping[str, Any]) -> dict:
    """Cross-validated survival for every mode × image encoder; see the module docstring.

    Returns {"out_dir", "summary" (DataFrame), "fold_metrics" (DataFrame), "oof_risks"
    (DataFrame), "logrank_p" {run name: p}, "kaplan_meier_png", "table" (the printed text)}.
    """
    cfg = apply_schema(SurvivalConfig, cfg)
    modes = list(cfg.modes)
    unknown = [m for m in modes if m not in MODE_NAMES]
    if unknown or not modes:
        raise InputError(None, "modes", "a non-empty list of " + ", ".join(MODE_NAMES), unknown or modes)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.cohort.synthetic:
        _prepare_synthetic(cfg, out_dir)
    for key in ("clinical_csv", "signatures_csv"):
        if not cfg.data[key]:
            raise InputError(None, f"data.{key}", "a path (or cohort.synthetic=true)", None)

    # Read and check every input before training anything.
    cohort = read_clinical(cfg.data.clinical_csv, read_signatures(cfg.data.signatures_csv))
    image_sources = _image_sources(cfg.data)
    if cfg.data.slides and not cfg.cohort.synthetic:
        if not cfg.encoders:
            raise InputError(None, "encoders", "at least one image encoder to embed data.slides with", "none")
        image_sources.update(embed_with_encoders(cfg, cfg.data.slides, out_dir / "embeddings"))
    if any(m in modes for m in ("pathology", "mcat", "past_multi")) and not image_sources:
        raise InputError(None, "data.image_embeddings", "a folder of per-slide embeddings (or {encoder: folder})", None)
    bags = {
        name: load_bags(cohort, folder, cfg.data.max_patches, int(cfg.seed)) for name, folder in image_sources.items()
    }
    cells = read_cell_embeddings(cfg.data.cell_embeddings, cohort) if cfg.data.cell_embeddings else None
    if "past_multi" in modes and cells is None:
        log.warning("no data.cell_embeddings: skipping PAST-multi")
        modes.remove("past_multi")
    save_config(cfg, out_dir / "config.yaml")
    log.info(
        "survival: %d patients (%d events), %d omic groups, encoders %s, modes %s",
        len(cohort),
        int(cohort.events.sum()),
        len(cohort.omics),
        list(image_sources),
        modes,
    )

    oracle = _oracle_features(cfg, cohort)
    with torch_threads(cfg.train.threads):
        result = _run_all(cfg, cohort, image_sources, bags, cells, modes, out_dir, oracle)
    return result


def _sites(cfg: DictConfig, cohort: Cohort) -> np.ndarray | None:
    """The clinical table's ``site`` column in cohort order (folds then hold out whole sites), or None."""
    table = pd.read_csv(cfg.data.clinical_csv, dtype={"case_id": str})
    if "site" not in table.columns:
        return None
    return table.set_index("case_id").loc[list(cohort.case_ids), "site"].astype(str).to_numpy()


def _oracle_features(cfg: DictConfig, cohort: Cohort) -> np.ndarray | None:
    """(n_patients, 1) planted bag state of a shared synthetic cohort (what the image part of the risk follows)."""
    if not (cfg.cohort.synthetic and cfg.data.clinical_csv):
        return None
    truth_path = Path(cfg.data.clinical_csv).parent / "ground_truth.json"
    truth = read_json_file(truth_path, "the synthetic cohort's ground truth") if truth_path.is_file() else {}
    if truth.get("kind") != "shared":
        return None
    return np.array([[truth["patients"][c]["bag_state"]] for c in cohort.case_ids], dtype=np.float64)


def _references_and_controls(
    cfg: DictConfig, cohort: Cohort, bags: Mapping[str, list], folds, oracle: np.ndarray | None
) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
    """ridge-Cox rows (per encoder, and on the oracle) with the same folds; (fold metrics, oof risks) lists."""
    fold_frames, oof_frames = [], []
    sources = {name: mean_bags(b) for name, b in bags.items()}
    if oracle is not None:
        sources["oracle"] = oracle
    for name, features in sources.items():
        fold_metrics, oof = ridge_cox_cv(features, cohort, folds)
        for frame in (fold_metrics, oof):
            frame.insert(0, "mode", "ridge_cox")
            frame.insert(0, "encoder", name)
        fold_frames.append(fold_metrics)
        oof_frames.append(oof)
    return fold_frames, oof_frames


def _controls_text(cfg: DictConfig, cohort: Cohort, oof_risks: pd.DataFrame, encoders: list[str]) -> tuple[str, dict]:
    """Pooled out-of-fold Harrell C with paired bootstrap intervals; the gate; PAST vs random verdicts."""
    replicates, estimates = {}, {}
    for (encoder, mode), oof in oof_risks.groupby(["encoder", "mode"], sort=False):
        estimates[(encoder, mode)], replicates[(encoder, mode)] = c_index_replicates(
            oof, cohort.case_ids, int(cfg.n_boot), int(cfg.seed)
        )
    lines = ["Pooled out-of-fold Harrell C with 95% bootstrap intervals (patients resampled, paired across runs):"]
    for (encoder, mode), value in estimates.items():
        low, high = interval(replicates[(encoder, mode)])
        lines.append(f"  {encoder:<12} {DISPLAY_NAMES[mode]:<16} {value:.3f} [{low:.3f}, {high:.3f}]")
    summary: dict = {
        "pooled_c": {f"{e}/{m}": {"c": v, "ci": list(interval(replicates[(e, m)]))} for (e, m), v in estimates.items()}
    }
    oracle, random_ref = ("oracle", "ridge_cox"), ("random", "ridge_cox")
    gate_passes = True
    if oracle in estimates and random_ref in estimates:
        verdict_gate = gate((estimates[oracle], replicates[oracle]), (estimates[random_ref], replicates[random_ref]))
        summary["gate"] = verdict_gate.as_dict()
        gate_passes = verdict_gate.passes
        lines.append("controls (ridge-Cox): " + verdict_gate.describe().replace("\n", "\n  "))
    ours = next((e for e in encoders if e not in ("random", "oracle", "-")), None)
    summary["versus_random"] = {}
    if ours and gate_passes:
        for mode in dict.fromkeys(m for _, m in estimates):
            a, b = (ours, mode), ("random", mode)
            if a in estimates and b in estimates:
                diff = difference(estimates[a] - estimates[b], replicates[a], replicates[b])
                summary["versus_random"][mode] = diff.as_dict()
                lines.append(f"  {DISPLAY_NAMES[mode]}: " + verdict(f"{ours} (C-index)", diff, "the random encoder"))
    return "\n".join(lines), summary


def _run_all(
    cfg: DictConfig,
    cohort: Cohort,
    image_sources: Mapping[str, str],
    bags: Mapping[str, list],
    cells: np.ndarray | None,
    modes: list[str],
    out_dir: Path,
    oracle: np.ndarray | None = None,
) -> dict:
    folds = patient_folds(
        cohort.case_ids, cohort.events, int(cfg.train.n_folds), int(cfg.seed), groups=_sites(cfg, cohort)
    )
    runs = [("-", m) if m == "genomic" else (enc, m) for m in modes for enc in (image_sources or {"-": None})]
    runs = list(dict.fromkeys(runs))  # the genomic-only model does not depend on the encoder
    if cfg.baseline_modes is not None:  # the random-encoder control trains only these modes (time)
        runs = [(e, m) for e, m in runs if e != "random" or m in cfg.baseline_modes]
    all_folds, all_oof, p_values = [], [], {}
    for encoder, mode in tqdm(runs, desc="survival runs", disable=not cfg.progress):
        fold_metrics, oof = cross_validate(
            cohort, bags.get(encoder), cells, mode, cfg.model, cfg.train, int(cfg.seed), progress=False, folds=folds
        )
        fold_metrics.insert(0, "mode", mode)
        fold_metrics.insert(0, "encoder", encoder)
        oof.insert(0, "mode", mode)
        oof.insert(0, "encoder", encoder)
        p_values[(encoder, mode)] = logrank_p(oof)
        all_folds.append(fold_metrics)
        all_oof.append(oof)
        log.info(
            "%s / %s: Harrell C %.3f ± %.3f",
            encoder,
            MODE_NAMES[mode],
            fold_metrics["harrell_c"].mean(),
            fold_metrics["harrell_c"].std(),
        )
    if cfg.ridge_cox and bags:
        reference_folds, reference_oof = _references_and_controls(cfg, cohort, bags, folds, oracle)
        all_folds.extend(reference_folds)
        all_oof.extend(reference_oof)
    fold_metrics = pd.concat(all_folds, ignore_index=True)
    oof_risks = pd.concat(all_oof, ignore_index=True)
    controls_text, controls = _controls_text(cfg, cohort, oof_risks, list(image_sources))
    summary = summary_table(fold_metrics)
    summary["logrank_p"] = [p_values.get((e, m), float("nan")) for e, m in zip(summary["encoder"], summary["mode"])]
    gains = paired_gains(fold_metrics)

    def _run_name(encoder: str, mode: str) -> str:
        name = DISPLAY_NAMES[mode]
        return name if encoder == "-" or len(image_sources) <= 1 else f"{name} · {encoder}"

    km_path = plot_kaplan_meier(
        {_run_name(e, m): oof_risks[(oof_risks["encoder"] == e) & (oof_risks["mode"] == m)] for e, m in runs},
        out_dir / "kaplan_meier.png",
    )
    for name, frame in (
        ("fold_metrics.csv", fold_metrics),
        ("summary.csv", summary),
        ("oof_risks.csv", oof_risks),
        ("paired_gains.csv", gains),
    ):
        with atomic_path(out_dir / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    write_metrics(
        out_dir / "metrics.json",
        {
            "n_patients": len(cohort),
            "n_events": int(cohort.events.sum()),
            "n_folds": len(folds),
            "summary": summary.to_dict(orient="records"),
            "folds": fold_metrics.to_dict(orient="records"),
            "paired_gains": gains.to_dict(orient="records"),
            "controls": controls,
        },
    )

    fold_table = fold_metrics.assign(mode=fold_metrics["mode"].map(MODE_NAMES))[
        ["encoder", "mode", "fold", "n_test", "n_events", "harrell_c", "uno_c"]
    ]
    table = format_summary(summary, p_values)
    print(f"\nSurvival, {len(folds)}-fold CV by patient ({len(cohort)} patients, {int(cohort.events.sum())} events)")
    print("\nPer fold:\n" + fold_table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\nMean ± sd over folds:\n" + table)
    if len(gains):
        print("\nPaired gain in Harrell C, fold by fold on the same test patients (mean ± sd, folds won):")
        for row in gains.itertuples():
            print(
                f"  {row.encoder:<12} {row.comparison:<30} {row.mean_gain:+.3f} ± {row.sd_gain:.3f}   "
                f"{row.folds_won}/{row.folds}"
            )
    print("\n" + controls_text)
    print(f"\nKaplan–Meier: {km_path}\nOutputs: {out_dir}\n")
    return {
        "out_dir": out_dir,
        "summary": summary,
        "fold_metrics": fold_metrics,
        "oof_risks": oof_risks,
        "logrank_p": {_run_name(e, m): p for (e, m), p in p_values.items()},
        "kaplan_meier_png": km_path,
        "table": table,
        "paired_gains": gains,
        "controls": controls,
    }


__all__ = ["run_survival", "embed_with_encoders", "embed_base_cells"]

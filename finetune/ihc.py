"""Virtual immunohistochemistry from H&E (PAST paper, "Single-cell virtual immunohistochemistry").

    python launch/finetune.py ihc --config configs/finetune/ihc_demo.yaml [key=value ...]

A U-Net translates each H&E tile into its IHC; FiLM layers on the bottleneck and every decoder
stage are driven by the PAST image embedding of the tile (:mod:`finetune.ihc_model`). Steps:

1. data: paired tiles in an IHC4BC/BCI-like layout (:mod:`finetune.ihc_data`); with
   ``data.synthetic`` set and the root missing (or ``overwrite``), a synthetic set is painted on
   the demo bundle's real H&E first;
2. embeddings: the frozen encoder (``encoder`` section, :func:`finetune.encoders.load_encoder`)
   embeds every full tile once (``embedding: projection`` = the joint-space projection when the
   encoder has one, else ``backbone`` features), standardised per dimension on the training tiles;
3. training: Adam (β 0.5, 0.999), λ·L1 (+ PatchGAN when ``gan.enabled``), random flips and 90°
   rotations applied to H&E and IHC alike, linear learning-rate decay over the last
   ``train.decay_fraction`` of the steps. The baseline is trained the same way in the same run:
   FiLM fed the embedding of a random encoder of the same architecture (``baseline: random``),
   the same U-Net without FiLM (``no_film``) or none;
4. evaluation on the test split: PSNR and SSIM per tile (RGB in [0, 1], data range 1), H-scores
   of predicted and real IHC on the same nuclei (the set's nuclei masks, else
   ``segment_nuclei`` on the H&E), their Pearson / Spearman correlation across tiles and mean
   absolute error; two references cost nothing: the H&E itself as the IHC ("identity") and the
   mean training IHC colour;
5. outputs in ``out_dir``: ``metrics.json``, ``per_tile.csv``, ``examples.png`` (H&E | predictions |
   real IHC), ``hscore_scatter.png``, ``generator.safetensors`` + ``generator.json``, ``config.yaml``;
6. optional whole-slide step (``wsi.slide``): overlapping tiles blended without seams into
   ``virtual_ihc.ome.tif`` (:func:`finetune.stitch.predict_slide_to_ome_tiff`) and a preview PNG.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data_shards.atomic import atomic_dir, atomic_path, write_json, save_png
from data_shards.config import save_config
from data_shards.errors import InputError

from .encoders import ImageEncoder, load_encoder, random_like, resolve_device
from .ihc_data import IHCPair, load_pair, read_pairs, read_rgb, read_truth, write_synthetic_ihc
from .ihc_model import (GAN_MODES, NORMS, FiLMUNet, build_discriminator, build_generator, discriminator_loss,
                        generator_loss, patchgan_receptive_field_px)
from .metrics import DEFAULT_DAB_THRESHOLDS, h_score, psnr, segment_nuclei, ssim

log = logging.getLogger(__name__)

BASELINES = ("random", "no_film", "none")
EMBEDDINGS = ("projection", "backbone")
WEIGHTS_NAME, META_NAME = "generator.safetensors", "generator.json"

IHC_DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/demo",
    "out_dir": None,
    "seed": 0,
    "progress": True,
    "device": "auto",  # auto | cpu | cuda | cuda:<i>
    "data": {
        "root": None,
        "split": {"test_fraction": 0.2, "seed": None},  # flat layouts only; seed null = the run's seed
        "cache": False,  # keep decoded training tiles in RAM (small sets)
        # {bundle, n_tiles, tile_px, seed, test_fraction, positivity_rate, intensity_scale, max_nucleus_um2,
        #  ink_green_minus_red, overwrite}
        "synthetic": None,
    },
    "encoder": {"source": "export", "path": None},
    "embedding": "projection",
    "embed_batch_size": 64,
    "baseline": "random",
    "model": {"channels": [64, 128, 256, 512], "norm": "group", "film": True},
    "gan": {"enabled": False, "mode": "vanilla", "channels": 64, "n_layers": 3, "norm": "instance", "lr": None},
    "train": {"epochs": 50, "batch_size": 8, "lr": 2.0e-4, "betas": [0.5, 0.999], "l1_weight": 100.0,
              "decay_fraction": 0.5, "augment": True, "crop_px": None, "num_workers": 0, "train_fit_tiles": 32},
    "eval": {"thresholds": None, "batch_size": 8, "min_nucleus_area_px": 30, "n_examples": 4},
    "wsi": {"slide": None, "tile_px": None, "overlap_px": 64, "level": 0, "batch_size": 8, "tissue_only": True},
}


# ---------------------------------------------------------------------------------------------
# Config


def _validate(cfg: DictConfig) -> None:
    if not cfg.out_dir:
        raise InputError(None, "out_dir", "an output folder", cfg.out_dir)
    if not cfg.data.root:
        raise InputError(None, "data.root", "the paired H&E/IHC folder (HE/, IHC/)", cfg.data.root)
    out_dir, root = Path(cfg.out_dir).resolve(), Path(cfg.data.root).resolve()
    if root == out_dir or out_dir in root.parents:
        # out_dir is replaced as a whole when the run ends: data inside it would be deleted
        raise InputError(None, "data.root", f"a folder outside out_dir ({cfg.out_dir})", cfg.data.root)
    if cfg.baseline not in BASELINES:
        raise InputError(None, "baseline", f"one of {BASELINES}", cfg.baseline)
    if cfg.embedding not in EMBEDDINGS:
        raise InputError(None, "embedding", f"one of {EMBEDDINGS}", cfg.embedding)
    if cfg.model.norm not in NORMS:
        raise InputError(None, "model.norm", f"one of {NORMS}", cfg.model.norm)
    if cfg.gan.mode not in GAN_MODES:
        raise InputError(None, "gan.mode", f"one of {GAN_MODES}", cfg.gan.mode)
    for key in ("epochs", "batch_size"):
        if int(cfg.train[key]) < 1:
            raise InputError(None, f"train.{key}", "a positive integer", cfg.train[key])
    if not 0 <= float(cfg.train.decay_fraction) <= 1:
        raise InputError(None, "train.decay_fraction", "a fraction in [0, 1]", cfg.train.decay_fraction)
    thresholds = dab_thresholds(cfg)
    if len(thresholds) != 3 or not 0 <= thresholds[0] < thresholds[1] < thresholds[2]:
        raise InputError(None, "eval.thresholds", "three increasing DAB values (weak, moderate, strong)", thresholds)


def dab_thresholds(cfg: DictConfig) -> list[float]:
    """(weak, moderate, strong) DAB thresholds: ``eval.thresholds`` or ``DEFAULT_DAB_THRESHOLDS``."""
    given = cfg.eval.thresholds
    return [float(t) for t in (DEFAULT_DAB_THRESHOLDS if given is None else given)]


def resolve_which(encoder: ImageEncoder, embedding: str) -> str:
    """``projection`` uses the joint-space projection when the encoder has one, else backbone features."""
    if embedding == "projection" and encoder.has_projection:
        return "projected"
    return "backbone"


# ---------------------------------------------------------------------------------------------
# Data


def prepare_data(cfg: DictConfig) -> Path:
    """The paired-tile root; paints the synthetic set first when ``data.synthetic`` asks for it."""
    root = Path(cfg.data.root)
    synthetic = cfg.data.synthetic
    if synthetic is None or (root.exists() and not bool(synthetic.get("overwrite", False))):
        if synthetic is not None:
            log.info("using the existing synthetic IHC set %s (data.synthetic.overwrite=true repaints it)", root)
        return root
    from .stain_tiles import demo_cell_tiles

    if not synthetic.get("bundle"):
        raise InputError(None, "data.synthetic.bundle", "the demo bundle whose H&E the IHC is painted on", None)
    seed = int(synthetic.get("seed", cfg.seed))
    tiles = demo_cell_tiles(synthetic.bundle, int(synthetic.get("n_tiles", 200)), int(synthetic.get("tile_px", 256)),
                            seed=seed)
    write_synthetic_ihc(root, tiles, seed=seed, test_fraction=float(synthetic.get("test_fraction", 0.2)),
                        thresholds=dab_thresholds(cfg),
                        positivity_rate=list(synthetic.get("positivity_rate", (0.8, 1.0))),
                        intensity_scale=list(synthetic.get("intensity_scale", (0.85, 1.15))),
                        max_nucleus_um2=synthetic.get("max_nucleus_um2", 120.0),
                        ink_green_minus_red=synthetic.get("ink_green_minus_red", 15.0),
                        overwrite=bool(synthetic.get("overwrite", False)))
    return root


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) → float32 (..., 3, H, W) in [−1, 1] (the generator's input and target range)."""
    x = torch.as_tensor(np.ascontiguousarray(images_uint8)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, -3)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [−1, 1] → uint8 (B, H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


class EmbeddingScaler:
    """Per-dimension standardisation fitted on the training tiles' embeddings (mean 0, sd 1).

    Projection outputs are L2-normalised (entries ~ 1/√D); standardising puts every encoder's
    embedding on the same scale for the FiLM projections, whatever its width or normalisation.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def fit(cls, embeddings: np.ndarray) -> "EmbeddingScaler":
        std = embeddings.std(axis=0)
        return cls(embeddings.mean(axis=0), np.where(std > 1e-6, std, 1.0))

    def __call__(self, embeddings: np.ndarray | torch.Tensor):
        if isinstance(embeddings, torch.Tensor):
            mean = torch.as_tensor(self.mean, device=embeddings.device)
            std = torch.as_tensor(self.std, device=embeddings.device)
            return (embeddings.float() - mean) / std
        return ((np.asarray(embeddings, np.float32) - self.mean) / self.std).astype(np.float32)


def embed_tiles(encoder: ImageEncoder, pairs: Sequence[IHCPair], which: str, batch_size: int, progress: bool,
                desc: str) -> np.ndarray:
    """float32 (n_tiles, D) embeddings of the full H&E tiles (resized to the encoder's input by its preprocess)."""
    from .embed import embed_images

    return embed_images(encoder, (read_rgb(p.he_path) for p in pairs), len(pairs), batch_size, which, progress,
                        desc=desc)


def train_crop_px(pairs: Sequence[IHCPair], crop_px: int | None, multiple_px: int) -> int:
    """Square training crop (px): ``crop_px`` or the smallest tile side, floored to a multiple of ``multiple_px``."""
    smallest = min(min(p.size_hw) for p in pairs)
    size = int(crop_px) if crop_px else smallest
    if size > smallest:
        raise InputError(None, "train.crop_px", f"at most the smallest training tile side ({smallest} px)", size)
    size -= size % multiple_px
    if size < multiple_px:
        raise InputError(None, "train.crop_px", f"at least {multiple_px} px (the generator's size multiple)", crop_px)
    return size


class PairDataset(Dataset):
    """Training samples: random square crops of (H&E, IHC) with the same random dihedral transform, plus the
    tile's standardised embedding. Yields he (3, s, s) and ihc (3, s, s) in [−1, 1], embedding (D,)."""

    def __init__(self, pairs: Sequence[IHCPair], embeddings: np.ndarray, crop_px: int, augment: bool = True,
                 cache: bool = False):
        self.pairs = list(pairs)
        self.embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        self.crop_px = int(crop_px)
        self.augment = bool(augment)
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def _images(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        he, ihc, _ = load_pair(self.pairs[index])
        if self.cache is not None:
            self.cache[index] = (he, ihc)
        return he, ihc

    def __getitem__(self, index: int):
        he, ihc = self._images(index)
        h, w = he.shape[:2]
        s = self.crop_px
        # torch's RNG: DataLoader workers get distinct, seeded streams.
        y0 = int(torch.randint(0, h - s + 1, ())) if self.augment else (h - s) // 2
        x0 = int(torch.randint(0, w - s + 1, ())) if self.augment else (w - s) // 2
        pair = to_model_range(np.stack([he[y0:y0 + s, x0:x0 + s], ihc[y0:y0 + s, x0:x0 + s]]))  # (2, 3, s, s)
        if self.augment:
            pair = torch.rot90(pair, int(torch.randint(0, 4, ())), dims=(-2, -1))
            if bool(torch.randint(0, 2, ())):
                pair = torch.flip(pair, dims=(-1,))
        return pair[0].contiguous(), pair[1].contiguous(), self.embeddings[index]


# ---------------------------------------------------------------------------------------------
# Training


def _set_requires_grad(module: torch.nn.Module | None, flag: bool) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


def train_step(generator: FiLMUNet, optimizer_g: torch.optim.Optimizer, he: torch.Tensor, ihc: torch.Tensor,
               embedding: torch.Tensor | None, l1_weight: float = 100.0, discriminator: torch.nn.Module | None = None,
               optimizer_d: torch.optim.Optimizer | None = None, gan_mode: str = "vanilla") -> dict:
    """One pix2pix step on a batch he, ihc (B, 3, H, W) in [−1, 1]: D update (when there is a D), then G update.

    Returns the losses as floats (``l1``, ``loss_g`` and with a GAN ``g_gan``, ``loss_d``).
    """
    fake = generator(he, embedding if generator.has_film else None)  # (B, 3, H, W)
    parts: dict[str, float] = {}
    fake_logits = None
    if discriminator is not None:
        optimizer_d.zero_grad(set_to_none=True)
        loss_d = discriminator_loss(discriminator(he, ihc), discriminator(he, fake.detach()), gan_mode)
        loss_d.backward()
        optimizer_d.step()
        parts["loss_d"] = float(loss_d.detach())
        _set_requires_grad(discriminator, False)  # G's step must not accumulate gradients in D
        fake_logits = discriminator(he, fake)
    try:
        loss_g, g_parts = generator_loss(fake, ihc, l1_weight, fake_logits, gan_mode)
        optimizer_g.zero_grad(set_to_none=True)
        loss_g.backward()
        optimizer_g.step()
    finally:
        _set_requires_grad(discriminator, True)
    return {**parts, **g_parts, "loss_g": float(loss_g.detach())}


def _lr_lambda(total_steps: int, decay_fraction: float):
    """pix2pix schedule: constant, then linear decay to 0 over the last ``decay_fraction`` of the steps."""
    decay_steps = int(round(total_steps * decay_fraction))
    start = total_steps - decay_steps

    def factor(step: int) -> float:
        if decay_steps == 0 or step < start:
            return 1.0
        return max(0.0, 1.0 - (step - start) / decay_steps)

    return factor


def fit_generator(generator: FiLMUNet, dataset: PairDataset, train_cfg: Mapping[str, Any], gan_cfg: Mapping[str, Any],
                  device: torch.device, seed: int = 0, progress: bool = True, desc: str = "train"
                  ) -> tuple[FiLMUNet, torch.nn.Module | None, list[dict]]:
    """Train ``generator`` (and a PatchGAN when ``gan_cfg.enabled``; none is built otherwise).

    Returns (generator, discriminator or None, per-epoch mean losses).
    """
    torch.manual_seed(seed)
    generator.to(device).train()
    lr, betas = float(train_cfg["lr"]), tuple(float(b) for b in train_cfg["betas"])
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    discriminator = optimizer_d = None
    if bool(gan_cfg.get("enabled", False)):
        discriminator = build_discriminator(dict(gan_cfg)).to(device).train()
        optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=float(gan_cfg.get("lr") or lr), betas=betas)
        log.info("%s: pix2pix with a %d×%d px PatchGAN (%s)", desc, *(2 * [patchgan_receptive_field_px(
            discriminator.n_layers)]), gan_cfg.get("mode", "vanilla"))
    loader = DataLoader(dataset, batch_size=int(train_cfg["batch_size"]), shuffle=True,
                        num_workers=int(train_cfg.get("num_workers", 0)),
                        generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda")
    epochs = int(train_cfg["epochs"])
    total = epochs * len(loader)
    schedule = _lr_lambda(total, float(train_cfg.get("decay_fraction", 0.5)))
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (optimizer_g, optimizer_d) if o is not None]
    l1_weight, gan_mode = float(train_cfg["l1_weight"]), gan_cfg.get("mode", "vanilla")
    history: list[dict] = []
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for epoch in range(epochs):
            sums: dict[str, float] = {}
            for he, ihc, embedding in loader:
                parts = train_step(generator, optimizer_g, he.to(device), ihc.to(device), embedding.to(device),
                                   l1_weight, discriminator, optimizer_d, gan_mode)
                for scheduler in schedulers:
                    scheduler.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.update(1)
                bar.set_postfix(l1=f"{parts['l1']:.4f}")
            history.append({"epoch": epoch + 1, **{k: v / len(loader) for k, v in sums.items()}})
    log.info("%s: %d epochs, %d steps, last epoch L1 %.4f", desc, epochs, total, history[-1]["l1"])
    return generator.eval(), discriminator, history


# ---------------------------------------------------------------------------------------------
# Prediction and evaluation


@torch.no_grad()
def predict_ihc(generator: FiLMUNet, he_tiles: Sequence[np.ndarray], embeddings: np.ndarray | None,
                device: torch.device) -> list[np.ndarray]:
    """uint8 IHC (H, W, 3) per uint8 H&E tile; tiles whose sides are not multiples of the generator's are
    reflect-padded and cropped back. Same-size tiles run as one batch."""
    generator.eval()
    m = generator.multiple_px
    out: list[np.ndarray] = []
    emb = None if embeddings is None or not generator.has_film else torch.as_tensor(embeddings, dtype=torch.float32)
    same = len({t.shape for t in he_tiles}) == 1
    groups = [list(range(len(he_tiles)))] if same else [[i] for i in range(len(he_tiles))]
    for group in groups:
        x = to_model_range(np.stack([he_tiles[i] for i in group])).to(device)  # (B, 3, H, W)
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w)
                                        else "replicate")
        e = None if emb is None else emb[group].to(device)
        out.extend(to_uint8(generator(x, e)[..., :h, :w]))
    return out


def _as_unit(image_uint8: np.ndarray) -> np.ndarray:
    return image_uint8.astype(np.float64) / 255.0


def nuclear_dab(ihc_rgb: np.ndarray, nuclei: np.ndarray | None) -> float:
    """Mean over nuclei of each nucleus's mean DAB (``rgb2hed`` channel 2): the threshold-free read-out
    behind the H-score, robust to a prediction whose stain is paler than the real one."""
    if nuclei is None:
        return float("nan")
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed

    ids = np.unique(nuclei)
    ids = ids[ids > 0]
    return float(np.mean(ndi.mean(rgb2hed(ihc_rgb)[..., 2], labels=nuclei, index=ids)))


def tile_scores(pred: np.ndarray, real: np.ndarray, nuclei: np.ndarray | None,
                thresholds: Sequence[float]) -> dict[str, float]:
    """PSNR, SSIM and L1 of one predicted IHC (RGB in [0, 1], data range 1); its H-score and mean nuclear
    DAB on ``nuclei`` (NaN without nuclei)."""
    p, r = _as_unit(pred), _as_unit(real)
    scores = {"psnr": psnr(p, r, 1.0), "ssim": ssim(p, r, 1.0), "l1": float(np.abs(p - r).mean())}
    scores["h_score"] = float(h_score(pred, nuclei, thresholds)["h_score"]) if nuclei is not None else float("nan")
    scores["dab"] = nuclear_dab(pred, nuclei)
    return scores


def tile_nuclei(he: np.ndarray, nuclei: np.ndarray | None, min_area_px: int) -> np.ndarray | None:
    """The nuclei a tile is scored on: its mask when the set has one, else segmented on the H&E; None if none."""
    if nuclei is None:
        nuclei = segment_nuclei(he, min_area_px=min_area_px)
    return nuclei if nuclei.max() > 0 else None


def _correlation(x: np.ndarray, y: np.ndarray, kind: str) -> float:
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    # constant up to rounding (e.g. the mean-colour reference): no defined correlation
    if ok.sum() < 3 or any(np.allclose(v[ok], v[ok][0], rtol=1e-9, atol=0) for v in (x, y)):
        return float("nan")
    return float((stats.pearsonr if kind == "pearson" else stats.spearmanr)(x[ok], y[ok])[0])


def summarise(table: pd.DataFrame, model: str) -> dict[str, float]:
    """Mean PSNR/SSIM/L1 over tiles and the H-score agreement of ``model`` with the real IHC across tiles."""
    pred, real = table[f"h_score_{model}"].to_numpy(float), table["h_score_real"].to_numpy(float)
    ok = np.isfinite(pred) & np.isfinite(real)
    return {
        "psnr_db": float(table[f"psnr_{model}"].mean()), "ssim": float(table[f"ssim_{model}"].mean()),
        "l1": float(table[f"l1_{model}"].mean()),
        "h_score_pearson": _correlation(pred, real, "pearson"),
        "h_score_spearman": _correlation(pred, real, "spearman"),
        "h_score_mae": float(np.abs(pred[ok] - real[ok]).mean()) if ok.any() else float("nan"),
        "dab_pearson": _correlation(table[f"dab_{model}"].to_numpy(float), table["dab_real"].to_numpy(float),
                                    "pearson"),
        "n_tiles_scored": int(ok.sum()),
    }


def evaluate(models: Mapping[str, tuple[FiLMUNet, np.ndarray | None]], pairs: Sequence[IHCPair],
             mean_colour: np.ndarray, device: torch.device, thresholds: Sequence[float], min_area_px: int,
             batch_size: int, progress: bool) -> pd.DataFrame:
    """Per-tile table on the test pairs: for each model (and the references ``identity`` — the H&E as the
    IHC — and ``mean_colour``) PSNR, SSIM, L1 and H-score, beside the real IHC's H-score."""
    rows: list[dict] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="evaluate", unit="batch", disable=not progress,
                      leave=False):
        batch = pairs[start:start + batch_size]
        loaded = [load_pair(p) for p in batch]
        he_tiles = [he for he, _, _ in loaded]
        preds = {name: predict_ihc(g, he_tiles, None if e is None else e[start:start + len(batch)], device)
                 for name, (g, e) in models.items()}
        for i, (pair, (he, ihc, nuclei)) in enumerate(zip(batch, loaded)):
            nuclei = tile_nuclei(he, nuclei, min_area_px)
            row: dict[str, Any] = {"name": pair.name, "height_px": he.shape[0], "width_px": he.shape[1],
                                   "n_nuclei": 0 if nuclei is None else int(len(np.unique(nuclei)) - 1),
                                   "h_score_real": float(h_score(ihc, nuclei, thresholds)["h_score"])
                                   if nuclei is not None else float("nan"), "dab_real": nuclear_dab(ihc, nuclei)}
            references = {"identity": he, "mean_colour": np.broadcast_to(mean_colour, he.shape).astype(np.uint8)}
            for name, pred in [*((n, p[i]) for n, p in preds.items()), *references.items()]:
                row.update({f"{k}_{name}": v for k, v in tile_scores(pred, ihc, nuclei, thresholds).items()})
            rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def mean_l1(generator: FiLMUNet, pairs: Sequence[IHCPair], embeddings: np.ndarray | None,
            device: torch.device) -> float:
    """Mean absolute error (IHC RGB in [0, 1]) of the generator on full tiles (a fit check on training tiles)."""
    errors = []
    for i, pair in enumerate(pairs):
        he, ihc, _ = load_pair(pair)
        pred = predict_ihc(generator, [he], None if embeddings is None else embeddings[i:i + 1], device)[0]
        errors.append(np.abs(_as_unit(pred) - _as_unit(ihc)).mean())
    return float(np.mean(errors))


# ---------------------------------------------------------------------------------------------
# Outputs


def _number(value: float | None, fmt: str) -> str:
    """A table number, or "–" where it is undefined (NaN: e.g. a correlation with a constant prediction)."""
    return "–" if value is None or not np.isfinite(value) else format(value, fmt)


def format_table(results: Mapping[str, Mapping[str, float]], header: str) -> str:
    number = _number

    lines = [header, f"{'model':<20}{'PSNR dB':>9}{'SSIM':>8}{'L1':>8}{'H-score r':>11}{'rho':>8}{'MAE':>8}"
                     f"{'DAB r':>8}"]
    for name, r in results.items():
        lines.append(f"{name:<20}{number(r['psnr_db'], '.2f'):>9}{number(r['ssim'], '.3f'):>8}"
                     f"{number(r['l1'], '.4f'):>8}{number(r['h_score_pearson'], '.3f'):>11}"
                     f"{number(r['h_score_spearman'], '.3f'):>8}{number(r['h_score_mae'], '.1f'):>8}"
                     f"{number(r['dab_pearson'], '.3f'):>8}")
    lines.append("H-score r/rho: Pearson/Spearman of tile H-scores, predicted vs real IHC (same nuclei); MAE in "
                 "H-score points (0-300); DAB r: Pearson of the tiles' mean nuclear DAB (threshold-free)")
    return "\n".join(lines)


def plot_examples(path: Path, names: Sequence[str], he: Sequence[np.ndarray], preds: Mapping[str, Sequence[np.ndarray]],
                  real: Sequence[np.ndarray], h_scores: Mapping[str, Sequence[float]]) -> Path:
    """One row per tile: H&E | each model's predicted IHC | real IHC, H-scores in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["H&E", *preds, "real IHC"]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.6 * len(columns), 2.7 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        images = [he[row], *(p[row] for p in preds.values()), real[row]]
        for col, (title, image) in enumerate(zip(columns, images)):
            ax = axes[row, col]
            ax.imshow(image)
            ax.set_xticks([]), ax.set_yticks([])
            key = "real" if title == "real IHC" else title
            score = h_scores.get(key, [None] * len(names))[row]
            ax.set_title(title if score is None or not np.isfinite(score) else f"{title}\nH-score {score:.0f}",
                         fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=7)
    return save_png(fig, path, dpi=110)


def plot_hscore_scatter(path: Path, real: np.ndarray, preds: Mapping[str, np.ndarray],
                        results: Mapping[str, Mapping[str, float]]) -> Path:
    """Predicted vs real H-score per test tile, one colour per model, with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 300], [0, 300], color="0.6", lw=1, ls="--")
    for name, pred in preds.items():
        r = results[name]["h_score_pearson"]
        ax.scatter(real, pred, s=14, alpha=0.75, label=f"{name} (r = {r:.2f})" if np.isfinite(r) else name)
    ax.set_xlim(-5, 305), ax.set_ylim(-5, 305)
    ax.set_xlabel("H-score, real IHC"), ax.set_ylabel("H-score, predicted IHC")
    ax.legend(fontsize=7, loc="upper left")
    return save_png(fig, path, dpi=120)


def save_generator(folder: Path, generator: FiLMUNet, meta: Mapping[str, Any]) -> None:
    """``generator.safetensors`` + ``generator.json`` (architecture, embedding scaler, encoder), each atomic."""
    from safetensors.torch import save

    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        # bytes into the temporary file: save_file would recreate it with private (0600) permissions
        tmp.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}))
    write_json(folder / META_NAME, {"channels": generator.channels, "norm": generator.norm,
                                    "embedding_dim": generator.embedding_dim, **meta})


def load_generator(folder: str | Path, device: str | torch.device = "cpu") -> tuple[FiLMUNet, dict]:
    """The generator :func:`save_generator` wrote, in eval mode, and its metadata (embedding mean/std, encoder)."""
    from safetensors.torch import load_file

    from data_shards.errors import read_json_file

    folder = Path(folder)
    meta = read_json_file(folder / META_NAME, "a virtual-IHC generator config (generator.json)")
    generator = FiLMUNet(meta["channels"], meta.get("embedding_dim"), norm=meta.get("norm", "group"))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(weights, None, "the generator weights", "no such file")
    generator.load_state_dict(load_file(str(weights)), strict=True)
    return generator.to(device).eval(), meta


# ---------------------------------------------------------------------------------------------
# Whole slide


def slide_predictor(generator: FiLMUNet, encoder: ImageEncoder | None, which: str, scaler: EmbeddingScaler | None,
                    device: torch.device):
    """``predict_batch`` for :mod:`finetune.stitch`: uint8 (B, t, t, 3) → float32 (B, t, t, 3) on the 0–255 scale,
    each tile embedded by the encoder on the fly (the slide's tiles were never embedded before)."""

    @torch.no_grad()
    def predict_batch(tiles: np.ndarray) -> np.ndarray:
        embedding = None
        if generator.has_film:
            embedding = scaler(encoder(encoder.preprocess(tiles), which=which).float()).to(device)  # (B, D)
        out = generator(to_model_range(tiles).to(device), embedding)  # (B, 3, t, t) in [-1, 1]
        return ((out.float().clamp(-1, 1) + 1.0) * 127.5).movedim(1, -1).cpu().numpy()

    return predict_batch


def run_wsi(cfg: DictConfig, folder: Path, generator: FiLMUNet, encoder: ImageEncoder, which: str,
            scaler: EmbeddingScaler, tile_px: int, device: torch.device, progress: bool) -> dict:
    """Virtual IHC of a whole slide → ``virtual_ihc.ome.tif`` and ``virtual_ihc_preview.png`` in ``folder``."""
    from .stitch import predict_slide_to_ome_tiff

    wsi = cfg.wsi
    tile = int(wsi.tile_px or tile_px)
    if tile % generator.multiple_px:
        raise InputError(None, "wsi.tile_px", f"a multiple of {generator.multiple_px} px", tile)
    summary = predict_slide_to_ome_tiff(
        wsi.slide, folder / "virtual_ihc.ome.tif", slide_predictor(generator, encoder, which, scaler, device),
        tile_px=tile, overlap_px=int(wsi.overlap_px), batch_size=int(wsi.batch_size), level=int(wsi.level),
        tissue_only=bool(wsi.tissue_only), progress=progress, description="virtual IHC")
    summary["preview"] = _plot_wsi_preview(folder / "virtual_ihc_preview.png", Path(wsi.slide),
                                           folder / "virtual_ihc.ome.tif")
    return summary


def _plot_wsi_preview(path: Path, slide_path: Path, ihc_path: Path, max_side: int = 1024) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_shards.slide import Slide

    with Slide(slide_path) as slide:
        he, _ = slide.thumbnail(max_side)
    with Slide(ihc_path) as slide:
        ihc, _ = slide.thumbnail(max_side)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5 * he.shape[0] / he.shape[1] + 0.4))
    for ax, image, title in zip(axes, (he, ihc), ("H&E", "virtual IHC")):
        ax.imshow(image), ax.set_title(title), ax.axis("off")
    return save_png(fig, path, dpi=110).name


# ---------------------------------------------------------------------------------------------
# Entry point


def _finite(obj: Any) -> Any:
    """JSON has no NaN: undefined values become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _example_indices(real_h_scores: np.ndarray, n: int) -> list[int]:
    """Tiles spread over the real H-score range (evenly spaced ranks), so the figure shows low to high."""
    order = np.argsort(np.nan_to_num(real_h_scores, nan=-1.0), kind="stable")
    n = min(n, len(order))
    return [int(order[i]) for i in np.linspace(0, len(order) - 1, n).round().astype(int)] if n else []


def run_ihc(cfg) -> dict:
    """``python launch/finetune.py ihc --config ...``: train, evaluate, print and write (module docstring).

    Returns the metrics dict also written to ``metrics.json`` (plus ``out_dir`` and ``table``).
    """
    cfg = OmegaConf.merge(OmegaConf.create(IHC_DEFAULTS), cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))
    _validate(cfg)
    started = time.perf_counter()
    seed, progress = int(cfg.seed), bool(cfg.progress)
    device = resolve_device(cfg.device)
    thresholds = dab_thresholds(cfg)
    timings: dict[str, float] = {}

    root = prepare_data(cfg)
    split_seed = seed if cfg.data.split.seed is None else int(cfg.data.split.seed)
    train_pairs = read_pairs(root, "train", float(cfg.data.split.test_fraction), split_seed)
    test_pairs = read_pairs(root, "test", float(cfg.data.split.test_fraction), split_seed)
    truth = read_truth(root)
    timings["data_s"] = time.perf_counter() - started

    encoder = load_encoder(OmegaConf.to_container(cfg.encoder, resolve=True), seed=seed, device=device)
    which = resolve_which(encoder, cfg.embedding)
    # name -> (encoder whose embedding drives FiLM, or None for a U-Net without FiLM; which output)
    variants: dict[str, tuple[ImageEncoder | None, str]] = {}
    if bool(cfg.model.film):
        main_name = ("random_init" if encoder.description.get("source") == "random" else "pretrained") + "_film"
        variants[main_name] = (encoder, which)
        if cfg.baseline == "random":
            # random_like has no projection head: its pooled backbone features drive FiLM
            variants["random_film"] = (random_like(encoder, seed=seed + 1), "backbone")
        elif cfg.baseline == "no_film":
            variants["no_film"] = (None, "backbone")
    else:
        main_name = "no_film"
        variants[main_name] = (None, "backbone")
        if cfg.baseline != "none":
            log.info("model.film is false: the main model is the plain U-Net, no %s baseline to compare", cfg.baseline)

    t0 = time.perf_counter()
    embeddings: dict[str, tuple[np.ndarray, np.ndarray, EmbeddingScaler] | None] = {}
    for name, (enc, w) in variants.items():
        if enc is None:
            embeddings[name] = None
            continue
        train_emb = embed_tiles(enc, train_pairs, w, int(cfg.embed_batch_size), progress, f"embed {name} train")
        test_emb = embed_tiles(enc, test_pairs, w, int(cfg.embed_batch_size), progress, f"embed {name} test")
        scaler = EmbeddingScaler.fit(train_emb)
        embeddings[name] = (scaler(train_emb), scaler(test_emb), scaler)
    timings["embed_s"] = time.perf_counter() - t0

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    gan_cfg = OmegaConf.to_container(cfg.gan, resolve=True)
    multiple = 2 ** (len(model_cfg["channels"]) - 1)
    crop = train_crop_px(train_pairs, train_cfg.get("crop_px"), multiple)
    generators: dict[str, FiLMUNet] = {}
    histories: dict[str, list[dict]] = {}
    fit_check: dict[str, float] = {}
    fit_pairs = train_pairs[: int(train_cfg.get("train_fit_tiles") or 0)]
    t0 = time.perf_counter()
    for name, emb in embeddings.items():
        torch.manual_seed(seed)  # the same U-Net initialisation for every variant
        generator = build_generator({**model_cfg, "film": emb is not None}, None if emb is None else emb[0].shape[1])
        generator.to(device)
        train_emb = emb[0] if emb is not None else np.zeros((len(train_pairs), 1), np.float32)
        if name == main_name and fit_pairs:
            fit_check["l1_untrained"] = mean_l1(generator, fit_pairs, None if emb is None else emb[0], device)
        dataset = PairDataset(train_pairs, train_emb, crop, bool(train_cfg["augment"]), bool(cfg.data.cache))
        generators[name], _, histories[name] = fit_generator(generator, dataset, train_cfg, gan_cfg, device, seed,
                                                             progress, desc=f"train {name}")
        if name == main_name and fit_pairs:
            fit_check["l1_trained"] = mean_l1(generators[name], fit_pairs, None if emb is None else emb[0], device)
            fit_check["n_tiles"] = len(fit_pairs)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # a subset is plenty for one mean colour and spares rereading a large training set
    mean_colour = np.mean([read_rgb(p.ihc_path).reshape(-1, 3).mean(axis=0) for p in train_pairs[:256]], axis=0)
    mean_colour = np.rint(mean_colour).astype(np.uint8)  # (3,) the training IHC's mean RGB
    models = {name: (g, None if embeddings[name] is None else embeddings[name][1]) for name, g in generators.items()}
    table = evaluate(models, test_pairs, mean_colour, device, thresholds, int(cfg.eval.min_nucleus_area_px),
                     int(cfg.eval.batch_size), progress)
    if truth is not None:
        table["h_score_planted"] = table["name"].map(truth["h_score"])
    rows = [*generators, "identity", "mean_colour"]
    results = {name: summarise(table, name) for name in rows}
    timings["evaluate_s"] = time.perf_counter() - t0

    comparison = {}
    baseline_name = next((n for n in generators if n != main_name), None)
    if baseline_name is not None:
        ours, base = results[main_name], results[baseline_name]
        comparison = {"baseline": baseline_name, "delta_psnr_db": ours["psnr_db"] - base["psnr_db"],
                      "delta_ssim": ours["ssim"] - base["ssim"],
                      "delta_h_score_pearson": ours["h_score_pearson"] - base["h_score_pearson"]}
    real_vs_planted = None
    if truth is not None:
        real_vs_planted = _correlation(table["h_score_real"].to_numpy(float), table["h_score_planted"].to_numpy(float),
                                       "pearson")

    out_dir = Path(cfg.out_dir)
    summary: dict[str, Any] = {
        "data_root": str(root), "n_train": len(train_pairs), "n_test": len(test_pairs), "train_crop_px": crop,
        "device": str(device), "encoder": encoder.description, "embedding": which, "main": main_name,
        "baseline": baseline_name, "thresholds": thresholds, "results": results, "comparison": comparison,
        "train_fit": fit_check, "real_vs_planted_h_score_pearson": real_vs_planted, "history": histories,
        "figures": ["examples.png", "hscore_scatter.png"], "wsi": None, "timings_s": timings, "seconds": None,
    }
    with atomic_dir(out_dir) as tmp:
        save_config(cfg, tmp / "config.yaml")
        table.to_csv(tmp / "per_tile.csv", index=False, float_format="%.5f")
        main_emb = embeddings[main_name]
        save_generator(tmp, generators[main_name], {
            "film": main_emb is not None, "embedding": which, "encoder": encoder.description, "train_crop_px": crop,
            "embedding_mean": None if main_emb is None else main_emb[2].mean.tolist(),
            "embedding_std": None if main_emb is None else main_emb[2].std.tolist()})
        examples = _example_indices(table["h_score_real"].to_numpy(float), int(cfg.eval.n_examples))
        example_pairs = [test_pairs[i] for i in examples]
        loaded = [load_pair(p) for p in example_pairs]
        he_tiles = [he for he, _, _ in loaded]
        example_preds = {name: predict_ihc(g, he_tiles, None if e is None else e[examples], device)
                         for name, (g, e) in models.items()}
        example_scores = {name: table[f"h_score_{name}"].to_numpy(float)[examples] for name in generators}
        example_scores["real"] = table["h_score_real"].to_numpy(float)[examples]
        plot_examples(tmp / "examples.png", [p.name for p in example_pairs], he_tiles, example_preds,
                      [ihc for _, ihc, _ in loaded], example_scores)
        plot_hscore_scatter(tmp / "hscore_scatter.png", table["h_score_real"].to_numpy(float),
                            {name: table[f"h_score_{name}"].to_numpy(float) for name in generators}, results)
        if cfg.wsi.slide:
            t0 = time.perf_counter()
            main_encoder = variants[main_name][0]
            summary["wsi"] = run_wsi(cfg, tmp, generators[main_name], main_encoder, which,
                                     None if main_emb is None else main_emb[2], crop, device, progress)
            summary["wsi"]["out_path"] = str(out_dir / "virtual_ihc.ome.tif")
            summary["figures"].append("virtual_ihc_preview.png")
            timings["wsi_s"] = time.perf_counter() - t0
        summary["seconds"] = round(time.perf_counter() - started, 1)
        write_json(tmp / "metrics.json", _finite(summary))

    header = (f"virtual IHC · {len(train_pairs)} train / {len(test_pairs)} test tiles · {crop} px crops · "
              f"embedding {which} · DAB thresholds {'/'.join(f'{t:.3f}' for t in thresholds)} · "
              f"{int(cfg.train.epochs)} epochs on {device}")
    text = format_table(results, header)
    if fit_check:
        text += (f"\ntraining tiles ({fit_check['n_tiles']}): L1 {fit_check['l1_untrained']:.4f} untrained → "
                 f"{fit_check['l1_trained']:.4f} trained")
    if comparison:
        text += (f"\n{main_name} vs {baseline_name}: Δ PSNR {_number(comparison['delta_psnr_db'], '+.2f')} dB, "
                 f"Δ SSIM {_number(comparison['delta_ssim'], '+.3f')}, "
                 f"Δ H-score r {_number(comparison['delta_h_score_pearson'], '+.3f')}")
    if real_vs_planted is not None:
        text += f"\nreal IHC vs planted H-score: r = {real_vs_planted:.3f} (a check of the scoring)"
    if summary["wsi"]:
        w = summary["wsi"]
        text += (f"\nwhole slide: {w['shape_hw'][1]} × {w['shape_hw'][0]} px, {w['tiles_predicted']} tiles "
                 f"({w['tiles_skipped']} background skipped) in {w['seconds']:.1f} s → virtual_ihc.ome.tif")
    text += (f"\nwritten to {out_dir}: metrics.json, per_tile.csv, generator.safetensors, "
             + ", ".join(summary["figures"]) + f" ({summary['seconds']:.0f} s)")
    print(text, flush=True)
    return {**summary, "out_dir": str(out_dir), "table": text}


__all__ = ["IHC_DEFAULTS", "BASELINES", "run_ihc", "prepare_data", "resolve_which", "EmbeddingScaler", "embed_tiles",
           "train_crop_px", "PairDataset", "train_step", "fit_generator", "predict_ihc", "tile_scores", "tile_nuclei",
           "evaluate", "summarise", "mean_l1", "format_table", "plot_examples", "plot_hscore_scatter", "save_generator",
           "load_generator", "slide_predictor", "run_wsi"]

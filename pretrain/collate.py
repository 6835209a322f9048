"""Decode shard samples late (after the shuffle buffer), augment them and collate a model batch.

Batch dict (what ``pretrain.models`` consumes), B cells, N = total neighbours of those B cells:

* ``image``: float32 (B, 3, H, W), channels first, normalised ``(x / 255 - mean) / std``;
* ``tokens``: int64 (B, L) rank tokens of each cell (pad id 1);
* ``nbr_tokens``: int64 (N, L), all neighbours of all cells, cell after cell;
* ``nbr_offsets_um``: float32 (N, 2), (dx, dy) µm neighbour minus centre, image frame
  (x right, y down), rotated/flipped together with the image;
* ``nbr_batch``: int64 (N,), index in [0, B) of each neighbour's centre cell (torch-geometric's
  ``batch`` vector), non-decreasing;
* ``meta``: list of B dicts (the sample's json), ``key``: list of B str.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.errors import InputError
from data_shards.sample import decode_sample, jpeg_decoder

from .augment import GREY_WEIGHTS, AugmentConfig, dihedral_image, dihedral_offsets, draw_colour, draw_dihedral
from .models.image_encoder import IMAGENET_MEAN, IMAGENET_STD


class BatchAssembler:
    """B raw samples -> the batch dict (module docstring): decode, augment, normalise, collate.

    Each sample is decoded and written straight into its slot of the (B, 3, H, W) float batch while
    its pixels are still in cache: the flip/rotation is a strided view of the decoded uint8 crop, and
    colour jitter, the [0, 1] clamp and the mean/std normalisation are folded into one per-channel
    affine map (plus a grey term with saturation jitter), so the pixels are touched only a few times.

    ``dihedral_rng`` and ``colour_rng`` are the worker's seeded generators: the augmentations are a
    deterministic function of (seed, epoch, rank, worker) and the sample order.
    """

    def __init__(
        self,
        augment: AugmentConfig | None,
        dihedral_rng: np.random.Generator,
        colour_rng: np.random.Generator,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        decoder: str = "imagecodecs",
    ):
        self.augment = augment
        self.jitter = augment if augment is not None and augment.any_colour else None
        self.dihedral_rng = dihedral_rng
        self.colour_rng = colour_rng
        self.decode_jpeg = jpeg_decoder(decoder)
        self.mean = np.asarray(image_mean, dtype=np.float64)
        self.std = np.asarray(image_std, dtype=np.float64)
        if self.mean.shape != (3,) or self.std.shape != (3,) or (self.std <= 0).any():
            raise InputError(None, "image_mean/image_std", "3 values each, std > 0", (image_mean, image_std))
        # Without jitter: z = x · scale + bias for uint8 x (no clamp needed, x / 255 is in [0, 1]).
        self.scale = (1.0 / (255.0 * self.std)).astype(np.float32).reshape(3, 1, 1)
        self.bias = (-self.mean / self.std).astype(np.float32).reshape(3, 1, 1)
        # [0, 1] in pixel space, in normalised units.
        self.low = (-self.mean / self.std).astype(np.float32).reshape(3, 1, 1)
        self.high = ((1.0 - self.mean) / self.std).astype(np.float32).reshape(3, 1, 1)
        self.grey_weights = np.asarray(GREY_WEIGHTS)
        self._scratch: np.ndarray | None = None

    def _write_image(self, slot: np.ndarray, image: np.ndarray, flip: int, turns: int) -> None:
        """Normalised, jittered float32 (3, H, W) into ``slot`` from the decoded uint8 (H, W, 3) crop.

        z = clamp(A x / 255 + c, 0, 1) normalised, with (A, c) of :meth:`ColourDraw.affine`. A is a
        diagonal plus a rank-one (grey) part, so z_c = D_c x_c + u_c grey + b_c: one casting pass from
        the strided uint8 view (the measured main cost, ~0.2 ms per 224 px crop) and a few in-cache
        passes, instead of a 3 × 3 matmul over the pixels (~2x slower when measured).
        """
        view = dihedral_image(image, flip, turns).transpose(2, 0, 1)  # (3, H, W) uint8, strided view
        if self.jitter is None:
            np.multiply(view, self.scale, out=slot, casting="unsafe")
            slot += self.bias
            return
        draw = draw_colour(self.colour_rng, self.jitter)
        # Contrast blends towards the image's mean grey; every 8th pixel estimates it well enough
        # (the mean does not depend on the flip/rotation, so read the contiguous crop).
        sub = image[::8, ::8].reshape(-1, 3).astype(np.float32)
        mean_rgb = (np.ones(len(sub), dtype=np.float32) @ sub) / (255.0 * len(sub))  # (3,) in [0, 1]
        k_beta = draw.contrast * draw.brightness
        mean_grey = draw.brightness * float(self.grey_weights @ (draw.gain * mean_rgb))
        diagonal = k_beta * draw.saturation * draw.gain / (255.0 * self.std)  # (3,) D
        np.multiply(view, diagonal.astype(np.float32).reshape(3, 1, 1), out=slot, casting="unsafe")
        if draw.saturation != 1.0:
            if self._scratch is None or self._scratch.shape != slot.shape:
                self._scratch = np.empty(slot.shape, dtype=np.float32)
            # grey = w·(G x) / 255 = Σ_j r_j slot_j with slot_j = D_j x_j.
            to_grey = (self.grey_weights * self.std / (k_beta * draw.saturation)).astype(np.float32)
            grey = np.tensordot(to_grey, slot, axes=1)  # (H, W)
            towards_grey = (k_beta * (1.0 - draw.saturation) / self.std).astype(np.float32).reshape(3, 1, 1)
            np.multiply(towards_grey, grey, out=self._scratch)
            slot += self._scratch
        slot += (((1.0 - draw.contrast) * mean_grey - self.mean) / self.std).astype(np.float32).reshape(3, 1, 1)
        np.clip(slot, self.low, self.high, out=slot)

    def __call__(self, raws: list[dict]) -> dict:
        images: torch.Tensor | None = None
        tokens, nbr_tokens, nbr_offsets, counts, metas, keys = [], [], [], [], [], []
        for i, raw in enumerate(raws):
            sample = decode_sample(raw, self.decode_jpeg)
            if images is None:
                height, width = sample.image.shape[:2]
                # numpy's allocator asks for transparent huge pages on large arrays: first-touch page
                # faults measured ~3x cheaper than on a fresh torch.empty of the same 38 MB batch.
                images = torch.from_numpy(np.empty((len(raws), 3, height, width), dtype=np.float32))  # (B, 3, H, W)
            elif sample.image.shape[:2] != tuple(images.shape[2:]):
                raise InputError(
                    raw.get("__url__"),
                    f"{sample.key}.jpg",
                    f"crops of {tuple(images.shape[2:])} px like the rest of the batch",
                    sample.image.shape[:2],
                )
            flip, turns = draw_dihedral(self.dihedral_rng, self.augment)
            self._write_image(images[i].numpy(), sample.image, flip, turns)
            tokens.append(sample.tokens)
            nbr_tokens.append(sample.nbr_tokens)
            nbr_offsets.append(dihedral_offsets(sample.nbr_offsets_um, flip, turns))
            counts.append(len(sample.nbr_tokens))
            metas.append(sample.meta)
            keys.append(sample.key)
        return {
            "image": images,
            "tokens": torch.from_numpy(np.stack(tokens).astype(np.int64)),  # (B, L)
            "nbr_tokens": torch.from_numpy(np.concatenate(nbr_tokens).astype(np.int64)),  # (N, L)
            "nbr_offsets_um": torch.from_numpy(np.concatenate(nbr_offsets).astype(np.float32)),  # (N, 2)
            "nbr_batch": torch.from_numpy(np.repeat(np.arange(len(raws), dtype=np.int64), counts)),  # (N,)
            "meta": metas,
            "key": keys,
        }

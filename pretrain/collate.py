"""Decode shard samples late (after the shuffle buffer) and collate a batch; pixels stay uint8.

Batch dict, B cells, N = total neighbours of those B cells. The loader workers only decode and
copy: flips/rotations of the image, colour jitter, the cast to float and the mean/std
normalisation run on the device, on the whole batch (:class:`pretrain.augment.DeviceImages`,
called by the trainer), so the host ships a quarter of the bytes and spends its time on the JPEG
decode alone.

* ``image``: uint8 (B, H, W, 3), the decoded crops as stored (channels last, not yet flipped);
* ``dihedral``: int64 (B, 2), (flip ∈ {0, 1}, quarter turns k ∈ {0..3}) drawn for each cell; the
  device applies it to the image, and it is already applied to ``nbr_offsets_um`` here;
* ``colour``: float32 (B, 6) colour-jitter factors per cell, (gain r, g, b, brightness,
  saturation, contrast) of :class:`pretrain.augment.ColourDraw`; absent without colour jitter;
* ``tokens``: int64 (B, L) rank tokens of each cell (pad id 1);
* ``nbr_tokens``: int64 (N, L), all neighbours of all cells, cell after cell;
* ``nbr_offsets_um``: float32 (N, 2), (dx, dy) µm neighbour minus centre, image frame
  (x right, y down), rotated/flipped by the cell's ``dihedral``;
* ``nbr_batch``: int64 (N,), index in [0, B) of each neighbour's centre cell (torch-geometric's
  ``batch`` vector), non-decreasing;
* ``meta``: list of B dicts (the sample's json), ``key``: list of B str;
* ``bad``: list of dicts ``{"shard", "key", "error", "samples"}``, the unreadable samples (and
  unreadable parts of shards) met while this batch was read; each was replaced by the next sample.

Random draws (flip/rotation, colour) are made once per batch, for its B cells, so
:meth:`BatchAssembler.skip` can reproduce them for batches a resumed run skips without decoding.
"""

from __future__ import annotations

from collections.abc import Iterator

import imagecodecs
import numpy as np
import torch

from common.errors import InputError
from data_shards.sample import decode_cell_arrays, decode_image, jpeg_decoder

from .augment import AugmentConfig, dihedral_matrix

# A worker that meets this many unreadable samples in a row stops: nothing it reads decodes.
MAX_CONSECUTIVE_BAD = 1000
# (8, 2, 2) offset matrices of the dihedral transforms, index 4 · flip + turns (entries 0, ±1: exact).
_DIHEDRAL_MATRICES = np.stack([dihedral_matrix(f, t) for f in (0, 1) for t in range(4)]).astype(np.float32)


def bad_record(shard: object, key: object, error: BaseException | str, samples: int = 1) -> dict:
    """One entry of a batch's ``bad`` list (JSON-friendly)."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"shard": None if shard is None else str(shard), "key": key, "error": message, "samples": int(samples)}


class BatchAssembler:
    """Raw samples -> the batch dict (module docstring): decode, draw augmentations, collate.

    ``dihedral_rng`` and ``colour_rng`` are the worker's seeded generators: the augmentations are a
    deterministic function of (seed, epoch, rank, worker) and the batch order (drawn once per batch).
    With the imagecodecs decoder each JPEG is decoded straight into its row of the uint8 batch.
    """

    def __init__(
        self,
        augment: AugmentConfig | None,
        dihedral_rng: np.random.Generator,
        colour_rng: np.random.Generator,
        decoder: str = "imagecodecs",
    ):
        self.augment = augment
        self.jitter = augment if augment is not None and augment.any_colour else None
        self.dihedral_rng = dihedral_rng
        self.colour_rng = colour_rng
        self.decode_jpeg = jpeg_decoder(decoder)
        self.decode_into = decoder == "imagecodecs"

    def _draw(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Augmentations of the next batch of ``n`` cells: (n, 2) int64 (flip, turns) and (n, 6)
        float32 colour factors (gain r, g, b, brightness, saturation, contrast) or None."""
        augment, dihedral = self.augment, np.zeros((n, 2), dtype=np.int64)
        if augment is not None and augment.flip:
            dihedral[:, 0] = self.dihedral_rng.integers(2, size=n)
        if augment is not None and augment.rot90:
            dihedral[:, 1] = self.dihedral_rng.integers(4, size=n)
        colour = None
        if self.jitter is not None:
            jitter = self.jitter
            amplitudes = np.array([jitter.channel_gain] * 3 + [jitter.brightness, jitter.saturation, jitter.contrast])
            colour = (1.0 + amplitudes * self.colour_rng.uniform(-1.0, 1.0, size=(n, 6))).astype(np.float32)
        return dihedral, colour

    def skip(
        self, raws: Iterator[dict], n_batches: int, batch_size: int, bad_keys: frozenset | set = frozenset()
    ) -> int:
        """Consume ``n_batches`` batches of ``raws`` without decoding them (a resumed run's consumed
        batches), drawing their augmentations so the stream continues as if they had been read.
        Keys in ``bad_keys`` (unreadable when first met) are passed over uncounted. Returns the number
        of raw samples consumed."""
        consumed = 0
        for _ in range(n_batches):
            self._draw(batch_size)
            good = 0
            while good < batch_size:
                raw = next(raws, None)
                if raw is None:
                    return consumed
                consumed += 1
                good += raw.get("__key__") not in bad_keys
        return consumed

    def _decode_image(self, raw: dict, images: np.ndarray | None, row: int) -> np.ndarray:
        """Decode the crop into ``images[row]`` (allocating the (B, H, W, 3) batch on the first one)."""
        if images is not None and self.decode_into:
            try:
                imagecodecs.jpeg8_decode(raw["jpg"], out=images[row])
                return images
            except Exception:  # greyscale, another size, or broken: the checked route says which
                pass
        image = decode_image(raw, self.decode_jpeg)  # uint8 (H, W, 3), InputError naming shard + member
        if images is None:
            # numpy's allocator asks for transparent huge pages on large arrays: first-touch page
            # faults measured ~3x cheaper than on a fresh torch.empty of the same batch.
            images = np.empty((self.batch_size, *image.shape), dtype=np.uint8)  # (B, H, W, 3)
        elif image.shape != images.shape[1:]:
            raise InputError(
                raw.get("__url__"),
                f"{raw.get('__key__')}.jpg",
                f"crops of {images.shape[1:3]} px like the rest of the batch",
                image.shape[:2],
            )
        images[row] = image
        return images

    def next_batch(self, raws: Iterator[dict], batch_size: int, bad: list[dict]) -> dict | None:
        """The next batch of ``batch_size`` decodable samples, or None when ``raws`` ends first.

        An unreadable sample (bad JPEG, truncated .npy, missing member, odd crop size) is recorded
        in ``bad`` and replaced by the next one; ``bad`` (shared with the shard reader, which records
        unreadable shards there) is moved into the batch's ``bad`` list and emptied.
        """
        self.batch_size = batch_size
        dihedral, colour = self._draw(batch_size)
        images: np.ndarray | None = None
        tokens, nbr_tokens, nbr_offsets, counts, metas, keys = [], [], [], [], [], []
        in_a_row = 0
        while len(keys) < batch_size:
            raw = next(raws, None)
            if raw is None:
                return None
            try:
                images = self._decode_image(raw, images, len(keys))
                cell = decode_cell_arrays(raw)
            except Exception as exc:  # one unreadable sample: record it, take the next
                bad.append(bad_record(raw.get("__url__"), raw.get("__key__"), exc))
                in_a_row += 1
                if in_a_row >= MAX_CONSECUTIVE_BAD:
                    raise InputError(
                        raw.get("__url__"), None, "decodable samples", f"{in_a_row} unreadable samples in a row"
                    ) from exc
                continue
            in_a_row = 0
            tokens.append(cell.tokens)
            nbr_tokens.append(cell.nbr_tokens)
            nbr_offsets.append(cell.nbr_offsets_um)
            counts.append(len(cell.nbr_tokens))
            metas.append(cell.meta)
            keys.append(raw.get("__key__"))
        nbr_batch = np.repeat(np.arange(batch_size, dtype=np.int64), counts)  # (N,)
        offsets = np.concatenate(nbr_offsets).astype(np.float32, copy=False)  # (N, 2) µm, as stored
        # Each neighbour's offset moves with its cell's image: offset_new = M @ offset (exact).
        matrices = _DIHEDRAL_MATRICES[4 * dihedral[nbr_batch, 0] + dihedral[nbr_batch, 1]]  # (N, 2, 2)
        offsets = np.einsum("nij,nj->ni", matrices, offsets)
        batch = {
            "image": torch.from_numpy(images),  # uint8 (B, H, W, 3)
            "dihedral": torch.from_numpy(dihedral),  # int64 (B, 2)
            "tokens": torch.from_numpy(np.stack(tokens).astype(np.int64)),  # (B, L)
            "nbr_tokens": torch.from_numpy(np.concatenate(nbr_tokens).astype(np.int64)),  # (N, L)
            "nbr_offsets_um": torch.from_numpy(offsets),  # float32 (N, 2)
            "nbr_batch": torch.from_numpy(nbr_batch),  # (N,)
            "meta": metas,
            "key": keys,
            "bad": list(bad),
        }
        if colour is not None:
            batch["colour"] = torch.from_numpy(colour)  # float32 (B, 6)
        bad.clear()
        return batch

    def __call__(self, raws: list[dict]) -> dict:
        """A batch of all of ``raws`` (for benchmarks and tests); InputError if one is unreadable."""
        bad: list[dict] = []
        batch = self.next_batch(iter(raws), len(raws), bad)
        if batch is None:
            raise InputError(bad[0]["shard"], bad[0]["key"], "a decodable sample", bad[0]["error"])
        return batch

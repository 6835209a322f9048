"""One joint dihedral augmentation for the heads: the same flip/90° rotation on an image and its targets.

Histology has no preferred orientation, so training draws one of the 8 symmetries of the square
(the dihedral group D4) per sample: ``k`` counter-clockwise quarter turns (``np.rot90`` /
``torch.rot90`` from the first spatial axis towards the second), then, when ``flip``, a mirror
along the second spatial (width) axis. The same ``(k, flip)`` is applied to every array of a
sample — H&E, target stains, nucleus labels — so pixels stay in register.

Spatial axes are named per array: ``(0, 1)`` for numpy images laid out (H, W, ...), ``(-2, -1)``
for channel-first tensors (..., H, W). Numpy arrays come back C-contiguous copies; tensors
contiguous.

The draw: ``k`` first, then ``flip``, from a ``numpy.random.Generator`` when one is given, else
from torch's global generator (so each ``DataLoader`` worker draws from its own seeded stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)

# the 8 elements (k quarter turns, flip) of the dihedral group of the square
DIHEDRAL_ELEMENTS: tuple[tuple[int, bool], ...] = tuple((k, flip) for flip in (False, True) for k in range(4))


def draw_dihedral(rng: np.random.Generator | None = None) -> tuple[int, bool]:
    """One uniformly drawn element (k in 0..3, flip): ``k`` first, then ``flip`` (numpy ``rng`` or torch's RNG)."""
    if rng is None:
        k = int(torch.randint(0, 4, ()).item())
        flip = bool(torch.randint(0, 2, ()).item())
    else:
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
    return k, flip


def apply_dihedral(array: Array, k: int, flip: bool, axes: tuple[int, int] = (-2, -1)) -> Array:
    """``array`` turned ``k`` quarter turns in the plane ``axes`` (first → second), then mirrored along
    ``axes[1]`` when ``flip``; a contiguous copy."""
    if isinstance(array, torch.Tensor):
        out = torch.rot90(array, int(k), dims=tuple(axes))
        if flip:
            out = out.flip(axes[1])
        return out.contiguous()
    out = np.rot90(array, k=int(k), axes=tuple(axes))
    if flip:
        out = np.flip(out, axis=axes[1])
    return np.ascontiguousarray(out)


def random_dihedral(
    *arrays: Array, axes: tuple[int, int] | Sequence[tuple[int, int]] = (-2, -1), rng: np.random.Generator | None = None
) -> tuple[Array, ...]:
    """The same random dihedral transform applied to every array; ``axes`` is one pair for all or one per array."""
    per_array = _axes_per_array(axes, len(arrays))
    k, flip = draw_dihedral(rng)
    return tuple(apply_dihedral(a, k, flip, ax) for a, ax in zip(arrays, per_array))


def _axes_per_array(axes: tuple[int, int] | Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    if len(axes) == 2 and all(isinstance(a, (int, np.integer)) for a in axes):
        return [(int(axes[0]), int(axes[1]))] * n
    if len(axes) != n:
        raise ValueError(f"random_dihedral: {len(axes)} axis pairs for {n} arrays")
    return [(int(a[0]), int(a[1])) for a in axes]


__all__ = ["DIHEDRAL_ELEMENTS", "draw_dihedral", "apply_dihedral", "random_dihedral"]

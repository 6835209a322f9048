"""On-disk layout of paired H&E / IHC tiles: the one description its reader and its synthetic writer share.

The reader is :func:`finetune.ihc.data.read_pairs`; the demo's writer is
:func:`finetune.synthetic.ihc.write_synthetic_ihc`. The format lives here, apart from both, so
that the synthetic package (which the IHC head calls to paint its demo set) needs nothing from
the head's package. Layout (the BCI / IHC4BC convention: two folders of same-named images, one
per stain)::

    <root>/HE/<split>/<name>.png        split ∈ {train, test}; .png .jpg .jpeg .tif .tiff
    <root>/IHC/<split>/<name>.png       the IHC of the same tissue, same size, RGB
    <root>/nuclei/<split>/<name>.tif    optional: int nuclei label image of the H&E (0 = background)
    <root>/truth.csv                    optional: planted per-tile H-scores of a synthetic set

The flat variant ``<root>/HE/<name>.png`` + ``<root>/IHC/<name>.png`` (+ ``<root>/nuclei/<name>.tif``)
is split into train/test by a seeded fraction (:func:`seeded_test_names`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLITS = ("train", "test")
HE_DIR, IHC_DIR, NUCLEI_DIR, TRUTH_NAME = "HE", "IHC", "nuclei", "truth.csv"


def seeded_test_names(names: Sequence[str], test_fraction: float, seed: int) -> set[str]:
    """The names a flat layout holds out for testing: a seeded random ``test_fraction`` (≥ 1 when ≥ 2 names)."""
    if not 0 < float(test_fraction) < 1:
        raise InputError(None, "data.split.test_fraction", "a fraction in (0, 1)", test_fraction)
    names = sorted(names)
    n_test = int(round(test_fraction * len(names)))
    if len(names) >= 2:
        n_test = min(max(n_test, 1), len(names) - 1)
    order = np.random.default_rng(seed).permutation(len(names))
    return {names[i] for i in order[:n_test]}


__all__ = ["IMAGE_SUFFIXES", "SPLITS", "HE_DIR", "IHC_DIR", "NUCLEI_DIR", "TRUTH_NAME", "seeded_test_names"]

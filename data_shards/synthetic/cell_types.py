"""The cell types of the synthetic data and how each one looks on an H&E: the one look table.

Every generator of synthetic cells reads this table: the synthetic Xenium bundles
(:mod:`data_shards.synthetic.tissue`: nucleus ellipses drawn on the procedural H&E, cell
outlines grown around them) and the demo data of the image-to-image heads
(``finetune.synthetic`` stain tiles). Keeping one table means a "fibroblast" has the same
shape, size and darkness wherever a test or a demo meets one.

Units: lengths in µm (physical size, independent of the image's resolution), stain as
optical density (OD, unitless; ``-log10`` of transmitted light, as in
``skimage.color.rgb2hed``). To draw at a given resolution divide lengths by the image's
µm per pixel: :func:`nucleus_axes_px` does it for the nucleus.

The order of :data:`CELL_TYPES` is the ``cell_type_index`` used in the bundles' ground truth
and in the expression programs (:mod:`data_shards.synthetic.panel`); do not reorder it.
"""

from __future__ import annotations

from dataclasses import dataclass

CELL_TYPES = ("keratinocyte_basal", "keratinocyte_suprabasal", "fibroblast", "immune", "endothelial")


@dataclass(frozen=True)
class CellTypeLook:
    """How one cell type looks: nucleus ellipse, nucleus stain, cytoplasm rim."""

    nucleus_semi_major_um: float  # semi-axis (half the length) of the nucleus ellipse, µm
    nucleus_semi_minor_um: float  # semi-axis (half the width), µm; <= nucleus_semi_major_um
    hematoxylin_od: float  # mean hematoxylin optical density inside the nucleus
    cytoplasm_rim_um: float  # cytoplasm added around the nucleus to make the cell outline, µm


LOOKS: dict[str, CellTypeLook] = {
    "keratinocyte_basal": CellTypeLook(3.6, 2.8, 0.55, 3.0),
    "keratinocyte_suprabasal": CellTypeLook(4.2, 3.4, 0.40, 4.5),
    "fibroblast": CellTypeLook(5.0, 1.6, 0.65, 2.5),
    "immune": CellTypeLook(2.4, 2.1, 0.95, 1.5),  # small, round, dark
    "endothelial": CellTypeLook(4.5, 1.3, 0.60, 2.0),  # thin, lining a lumen
}
assert tuple(LOOKS) == CELL_TYPES


def look(cell_type: str) -> CellTypeLook:
    """The look of ``cell_type``; KeyError naming the known types otherwise."""
    try:
        return LOOKS[cell_type]
    except KeyError:
        raise KeyError(f"unknown cell type {cell_type!r}; known: {', '.join(CELL_TYPES)}") from None


def nucleus_axes_px(cell_type: str, um_per_px: float) -> tuple[float, float]:
    """(semi-major, semi-minor) of the nucleus in pixels of an image at ``um_per_px`` µm per pixel."""
    entry = look(cell_type)
    return entry.nucleus_semi_major_um / um_per_px, entry.nucleus_semi_minor_um / um_per_px

"""Synthetic demo and test data for the data stage: Xenium bundles with a post-Xenium H&E.

- :mod:`.bundle`: :func:`make_bundle` writes a whole bundle (Xenium files, H&E OME-TIFF,
  Explorer exports, ground truth) and :func:`planted_map` reads back the planted registration;
- :mod:`.cell_types`: the cell types and their look (the one look table, in µm);
- :mod:`.tissue`: cells found on a real H&E or laid out procedurally, and the procedural renderer;
- :mod:`.panel`: gene panel and per-cell expression;
- :mod:`.geometry`: the planted Xenium µm → H&E px map and Explorer's matrices;
- :mod:`.xenium_writer`: Xenium Onboard Analysis files (XOA v3 layout);
- :mod:`.morphology`: the DAPI morphology focus image and ``cells.zarr.zip`` (label masks);
- :mod:`.demo_slide`: fetches the demo's real H&E slide (``make setup``).

``python -m data_shards.synthetic OUT_DIR [--mode procedural --n-cells N ...]`` writes one bundle.
"""

from .bundle import DEFAULT_SLIDE, make_bundle, planted_map
from .cell_types import CELL_TYPES, LOOKS, CellTypeLook, nucleus_axes_px

__all__ = ["CELL_TYPES", "DEFAULT_SLIDE", "LOOKS", "CellTypeLook", "make_bundle", "nucleus_axes_px", "planted_map"]

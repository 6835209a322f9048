"""Per-cell results in the viewers pathologists and Xenium users already have.

- :mod:`.geojson`: QuPath's GeoJSON objects (cells / detections with measurements and a
  classification), label-mask outlines, and Xenium Explorer's ``cell_id,group`` CSV;
- :mod:`.xenium_cells`: Xenium cells mapped onto the H&E through their registration, with the gene
  head's predictions;
- :mod:`.mif_cells`: the mIF head's segmented nuclei with predicted marker means and calls;
- :mod:`.config` / :mod:`.run`: ``launch/finetune.py qupath`` (:class:`QuPathConfig`, :func:`run_qupath`).
"""

from .config import MIFCellsConfig, QuPathConfig, XeniumCellsConfig
from .geojson import cell_feature, class_colours, label_outlines, write_cell_groups_csv, write_feature_collection
from .run import run_qupath

__all__ = [
    "MIFCellsConfig",
    "QuPathConfig",
    "XeniumCellsConfig",
    "cell_feature",
    "class_colours",
    "label_outlines",
    "run_qupath",
    "write_cell_groups_csv",
    "write_feature_collection",
]

"""Register Xenium coordinates (µm) to the post-Xenium H&E slide (level-0 pixels), as in PAST.

- :mod:`.fit`: Kabsch / Umeyama least-squares fits and 3x3 homogeneous transforms;
- :mod:`.explorer`: Xenium Explorer's keypoints and image-alignment exports;
- :mod:`.registration`: :class:`Registration`, one transform per keypoint region (save / load),
  and its quality numbers (residuals, leave-one-out errors in µm, bounds);
- :mod:`.checks`: sanity checks that refuse a probably wrong registration (fitted µm/px against the
  slide's metadata, share of mapped cells on tissue);
- :mod:`.identity`: the bundle a registration belongs to (recorded in registration.json, checked when sharding);
- :mod:`.report`: the console table of those numbers and the overlay PNG;
- :mod:`.auto`: keypoints found between the Xenium DAPI image and the H&E (``keypoints: auto``);
- :mod:`.run`: :func:`register_bundle`, the step ``launch/make_shards.py register`` runs per slide.

Imports go one way: fit <- explorer <- registration <- checks, identity <- report <- run; fit <- auto <- run.
"""

from .auto import (
    AUTO,
    AUTO_KEYPOINTS_FILE,
    AutoKeypoints,
    find_keypoints,
    find_morphology_image,
    write_explorer_keypoints,
)
from .checks import check_on_tissue, check_um_per_px, on_tissue_fraction, similarity_um_per_px
from .explorer import (
    KEYPOINT_COLUMNS,
    KEYPOINT_FIXED_UNITS,
    XENIUM_PIXEL_SIZE_UM,
    read_explorer_alignment,
    read_explorer_keypoints,
)
from .fit import (
    RegistrationError,
    apply_transform,
    check_alignment_matrix,
    check_pairs,
    fit_transform,
    fit_um_to_px,
    linear_scale,
)
from .identity import bundle_identity, check_bundle_identity
from .registration import Region, Registration, check_report, leave_one_out_um, quality_report
from .report import format_table, write_overlay
from .run import read_cell_centroids_um, register_bundle

__all__ = [
    "AUTO",
    "AUTO_KEYPOINTS_FILE",
    "AutoKeypoints",
    "find_keypoints",
    "find_morphology_image",
    "write_explorer_keypoints",
    "KEYPOINT_COLUMNS",
    "KEYPOINT_FIXED_UNITS",
    "XENIUM_PIXEL_SIZE_UM",
    "Region",
    "Registration",
    "RegistrationError",
    "apply_transform",
    "bundle_identity",
    "check_alignment_matrix",
    "check_bundle_identity",
    "check_on_tissue",
    "check_pairs",
    "check_report",
    "check_um_per_px",
    "fit_transform",
    "fit_um_to_px",
    "format_table",
    "leave_one_out_um",
    "linear_scale",
    "on_tissue_fraction",
    "quality_report",
    "read_cell_centroids_um",
    "read_explorer_alignment",
    "read_explorer_keypoints",
    "register_bundle",
    "similarity_um_per_px",
    "write_overlay",
]

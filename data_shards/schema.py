"""Typed settings of the data stage: one schema for ``configs/data/*.yaml``.

One data config drives both entry points: ``launch/make_bundle.py`` reads its ``bundle``
section (a synthetic bundle), ``launch/make_shards.py`` (build / register / prepare / merge /
verify) reads the rest. :func:`common.config.load_config` checks a YAML file and ``key=value``
overrides against :class:`DataConfig` (unknown keys and wrong types refused, with the closest
valid key named); the run functions call :func:`common.config.apply_schema` on what they are
given, so a dict from a test or a notebook is checked the same way.

Units are in the names: ``_um`` micrometres, ``_px`` pixels, ``_um_per_px`` µm per pixel.
Paths inside a slide entry (``he_slide``) and in ``register`` (``keypoints``, ``alignment``,
``he_slide``) are relative to that slide's bundle folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

DEFAULT_HE_SLIDE = "he/post_xenium_he.ome.tif"


@dataclass
class BundleConfig:
    """``make_bundle`` settings: a simulated Xenium bundle (``data_shards.synthetic.make_bundle``)."""

    out_dir: Optional[str] = None  # folder the bundle is written to (required by make_bundle)
    mode: str = "real"  # "real": cells at the nuclei of a real H&E; "procedural": rendered tissue
    n_cells: int = 5000  # procedural mode only (real mode: one cell per detected nucleus)
    seed: int = 0  # same seed and settings give an identical bundle
    slide_path: Optional[str] = None  # real mode: the H&E slide; null = .cache/he/cmu_small_region.svs
    he_um_per_px: float = 0.5  # procedural mode: H&E µm per level-0 pixel (real mode: from the slide)
    n_genes: int = 300  # panel size (real marker genes + neutral background genes)
    mean_transcripts_per_cell: float = 180.0  # mean counted transcripts per cell
    rotation_deg_range: list[float] = field(default_factory=lambda: [3.0, 20.0])  # planted rotation (deg), drawn in
    deformation_um: float = 8.0  # amplitude of the smooth local deformation after the similarity (µm); 0 = none
    n_keypoints: int = 40  # keypoint pairs in the Explorer keypoints CSV
    keypoint_noise_um: float = 0.3  # Gaussian noise on both sides of each keypoint pair (µm)
    write_transcripts: Optional[bool] = None  # null = only when n_cells <= 200,000
    low_qv_fraction: float = 0.08  # extra low-quality (qv < 20) transcripts, relative to counted ones
    unassigned_fraction: float = 0.06  # extra transcripts outside any cell, relative to counted ones
    jpeg_quality: int = 90  # JPEG quality of the H&E OME-TIFF tiles
    overwrite: bool = True  # replace an existing bundle folder


@dataclass
class RegisterConfig:
    """One bundle's registration (``data_shards.register.register_bundle``); paths relative to the bundle."""

    # Explorer keypoints: fixedX,fixedY (Xenium morphology px, see keypoints_fixed_unit), alignmentX,alignmentY (H&E px);
    # "auto" = found between the DAPI morphology image and the H&E (data_shards.register.auto), saved as auto_keypoints.csv
    keypoints: Optional[str] = "he/keypoints.csv"
    keypoints_fixed_unit: str = "morphology_px"  # fixedX,fixedY unit: "morphology_px" (as Explorer writes) or "um"
    alignment: Optional[str] = None  # optional Explorer alignment CSV; when set it is used instead of fitting
    n_regions: int = 1  # keypoint regions by spatial k-means; 1 = one global transform
    blend: bool = False  # smooth Gaussian mix of neighbouring regions instead of the nearest region
    blend_sigma_um: Optional[float] = None  # Gaussian width in µm; null = half the median centroid spacing
    scale: bool = True  # similarity (Umeyama); false = rigid (Kabsch) after µm -> px with the slide's µm/px
    min_points_per_region: int = 4  # smaller (or collinear) regions are merged into their nearest neighbour
    max_rms_um: Optional[float] = 10.0  # refuse when a region's keypoint RMS residual passes this (µm); null = no bound
    max_loo_um: Optional[float] = (
        20.0  # refuse when a region's leave-one-out RMS error passes this (µm); null = no bound
    )
    he_slide: str = DEFAULT_HE_SLIDE  # pyramidal H&E, for the overlay and its µm/px
    he_um_per_px: Optional[float] = None  # override the slide's metadata (µm per level-0 pixel)
    # morphology-image µm/px for fixedX,fixedY and the alignment CSV; null = experiment.xenium's pixel_size
    # (0.2125, Xenium's, when the bundle has no experiment.xenium)
    xenium_pixel_size_um: Optional[float] = None
    # refuse when the fitted H&E µm/px (keypoints or alignment) differs from the slide's metadata by more than
    # this fraction: the sign of keypoints in the wrong unit, swapped columns or another slide; null = no check
    max_um_per_px_error: Optional[float] = 0.15
    # refuse when fewer than this fraction of the cells, mapped onto the H&E, land on tissue (keypoints or a
    # matrix from another slide); null = no check
    min_on_tissue_fraction: Optional[float] = 0.5
    # refuse when mapped cells land on tissue little more often than chance: (on-tissue fraction - tissue share
    # of the slide) / (1 - tissue share) below this (1 = all on tissue, 0 = chance); null = no check
    min_on_tissue_excess: Optional[float] = 0.5
    tissue_thumbnail_px: int = 2048  # side of the H&E thumbnail the on-tissue check's tissue mask is computed on
    random_state: int = 0  # k-means seed (and the RANSAC seed of keypoints: auto)
    # the H&E is the mirror image of the Xenium frame (scanned face down): fit with x flipped; keypoints: auto
    # refuses a mismatch between this and what it finds
    he_mirrored: bool = False
    # keypoints: auto only. The DAPI image, relative to the bundle; null = experiment.xenium's
    # morphology_focus_filepath, else morphology_focus/morphology_focus_0000.ome.tif, ... morphology.ome.tif
    morphology_image: Optional[str] = None
    auto_max_keypoints: int = 100  # at most this many tiles (one keypoint each) over the DAPI tissue
    auto_min_keypoints: int = 8  # refuse (images do not match) when fewer tiles match
    auto_min_correlation: float = 0.3  # a tile matches when its DAPI/hematoxylin correlation is at least this


@dataclass
class ShardsRegisterConfig(RegisterConfig):
    """``register`` in a data config: used for every slide without a saved registration."""

    he_slide: Optional[str] = None  # null = the slide entry's he_slide


@dataclass
class SlideConfig:
    """One entry of ``slides``."""

    id: Optional[str] = None  # names the slide's folder, its sample keys and its manifest entry (required)
    bundle: Optional[str] = None  # the Xenium bundle folder (required)
    he_slide: str = DEFAULT_HE_SLIDE  # pyramidal H&E, relative to the bundle
    registration: Optional[str] = None  # registration.json saved by `make_shards.py register`; null = fit now
    he_um_per_px: Optional[float] = None  # override the H&E's metadata (µm per level-0 px), for registration and crops
    meta: dict[str, Any] = field(default_factory=dict)  # copied into every sample's json (patient, cancer type...)


@dataclass
class TokensConfig:
    """Rank tokenization (``data_shards.tokenize.rank_tokens``)."""

    context_length: int = 300  # tokens per cell: 3 context tokens, genes by rank, padding
    assay: str = "xenium"  # context token: assay
    modality: str = "spatial"  # context token: modality
    organism: str = "human"  # context token: organism


@dataclass
class NeighboursConfig:
    """Spatial neighbours of each cell (``data_shards.neighbours.find_neighbours``)."""

    k: int = 8  # at most k nearest neighbours
    radius_um: Optional[float] = 50.0  # within this distance (µm); null = no radius


@dataclass
class CropConfig:
    """The H&E crop at each cell (``data_shards.crops.CropReader``)."""

    size_px: int = 224  # crop side (px)
    target_um_per_px: Optional[float] = None  # resample crops to this µm/px; null = the slide's level-0 µm/px
    out_of_bounds: str = "pad"  # crops reaching past the slide edge: "pad" (white) or "skip"
    on_read_error: str = "skip"  # a slide block that fails to decode: "skip" its cells or "raise"
    block_px: int = 2048  # side of the slide blocks read at once (level px)


@dataclass
class QCConfig:
    """Which cells are kept (``data_shards.qc``)."""

    min_transcripts: int = 10  # at least this many counted transcripts
    min_genes: int = 3  # at least this many genes detected
    require_nucleus: bool = True  # drop cells without a segmented nucleus
    on_tissue: bool = True  # drop cells whose registered centre lies off the tissue
    tissue_thumbnail_px: int = 2048  # side of the thumbnail the tissue mask is computed on


@dataclass
class ShardsConfig:
    """Shard files (``data_shards.writer``)."""

    samples_per_shard: int = 2000  # samples per .tar shard
    jpeg_quality: int = 90  # JPEG quality of the crops
    group_um: Optional[float] = None  # keep cells of the same group_um square together in a shard; null = shuffle all
    seed: int = 0  # shuffling seed
    # a slide's encoded samples are shuffled in memory while they fit this many MB (written once);
    # above it they are spilled to disk per shard and read back (same shard bytes either way)
    memory_budget_mb: int = 4096
    # threads JPEG-encoding the crops of one slide (the encoder releases the GIL, so they run beside
    # the sample assembly); null = the machine's cores / workers. Shard bytes do not depend on it.
    encode_threads: Optional[int] = None


@dataclass
class DataConfig:
    """A data config (``configs/data/*.yaml``): bundle settings, then slides -> shards settings."""

    run_dir: Optional[str] = None  # a folder other paths may refer to as ${run_dir}
    bundle: BundleConfig = field(default_factory=BundleConfig)  # launch/make_bundle.py only
    register: ShardsRegisterConfig = field(default_factory=ShardsRegisterConfig)  # for slides without a registration
    out_dir: str = "runs/shards"  # shard folder
    slides: list[SlideConfig] = field(default_factory=list)  # the slides to shard
    only_slides: Optional[list[str]] = None  # ids of the slides to process (a SLURM array task passes one); null = all
    workers: int = 1  # slides processed in parallel processes
    merge: bool = True  # write manifest.json after the slides
    vocab: str = "panel"  # "panel" (the bundles' genes) or a gene list / Nicheformer model.h5ad path
    tech_mean: Optional[str] = (
        "compute"  # "compute" (from the training cells), a .npy aligned to the vocabulary, or null
    )
    matrix: str = "auto"  # how counts are read: "auto", "h5" or "transcripts" (data_shards.xenium.read_xenium)
    min_qv: float = 20.0  # transcripts below this quality are not counted (matrix "transcripts")
    tokens: TokensConfig = field(default_factory=TokensConfig)
    neighbours: NeighboursConfig = field(default_factory=NeighboursConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    qc: QCConfig = field(default_factory=QCConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    progress: bool = True  # progress bars


def slide_register_config(register: Any, slide: Any) -> dict:
    """The registration settings of one slide: ``register`` with ``he_slide`` defaulting to the slide's."""
    settings = dict(register)
    if not settings.get("he_slide"):
        settings["he_slide"] = slide.get("he_slide") or DEFAULT_HE_SLIDE
    if slide.get("he_um_per_px") is not None:
        settings["he_um_per_px"] = slide.get("he_um_per_px")
    return settings

"""Region access to pyramidal whole-slide images without reading them whole.

Two backends behind one ``Slide`` API, chosen by what the file contains (never by its extension):

- **tifffile** for OME-TIFF (RGB stored interleaved ``YXS``, channel-first ``CYX`` or planar
  ``SYX``), Aperio SVS and plain pyramidal TIFFs. Pixels are fetched through tifffile's zarr
  interface, so only the tiles that overlap a requested region are decoded.
- **OpenSlide** (``openslide-python`` with the ``openslide-bin`` wheel) for the scanner formats whose
  layout or pixel size tifffile does not give us: Hamamatsu NDPI/VMS, MIRAX, Leica SCN, Philips
  TIFF, Ventana BIF, DICOM-WSI, ... µm/px comes from OpenSlide's ``openslide.mpp-x``.

Coordinates are (x, y) in pixels of the requested pyramid level; level 0 is full resolution at
``um_per_px`` µm/pixel. A truncated or corrupt TIFF is refused as such when opened, not later as a
missing pixel size or an undecodable tile.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
import zarr

from common.errors import InputError

try:  # the wheel ships the C library; a machine where it cannot load still reads OME-TIFF and SVS
    import openslide
except (ImportError, OSError):  # pragma: no cover - openslide-bin is a declared dependency
    openslide = None

log = logging.getLogger(__name__)

_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
BACKENDS = ("auto", "tifffile", "openslide")
# OpenSlide vendors that are plain tiled TIFFs tifffile reads as well: tifffile keeps them (as before)
_OPENSLIDE_GENERIC = {"generic-tiff"}
_OPENSLIDE_DEFAULT_TILE_PX = 256


def _ome_um_per_px(tif: tifffile.TiffFile) -> float | None:
    if not tif.is_ome or not tif.ome_metadata:
        return None
    root = ET.fromstring(tif.ome_metadata)
    for node in root.iter():
        if node.tag.endswith("Pixels") and "PhysicalSizeX" in node.attrib:
            unit = node.attrib.get("PhysicalSizeXUnit", "µm")
            return float(node.attrib["PhysicalSizeX"]) * _UNIT_TO_UM.get(unit, 1.0)
    return None


def _svs_um_per_px(tif: tifffile.TiffFile) -> float | None:
    description = tif.pages[0].description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    return float(match.group(1)) if match else None


class _Records(logging.Handler):
    """Collects tifffile's error records: it logs (and skips) tags and pages past the end of a cut file."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _tifffile_errors():
    handler = _Records()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


def _truncated(path: Path, detail: str) -> InputError:
    return InputError(path, None, "a complete TIFF", f"truncated or corrupt: {detail}")


class _TiffLevel:
    """One level of a tifffile series as an (H, W, 3)-indexable array, whatever the channel layout.

    ``channel_axis`` is None for interleaved ``...YXS`` / grey ``YX`` pixels, else the axis of the
    colour planes (``C`` or planar ``S``) that precedes Y and X. Leading axes of size > 1 (T, Z) are
    read at index 0.
    """

    def __init__(self, array: zarr.Array, axes: str, channel_axis: int | None):
        self._array = array
        self._lead = tuple(0 for _ in range(axes.index("Y") - (channel_axis is not None)))
        self._channel_first = channel_axis is not None
        y = axes.index("Y")
        self.chunks = tuple(int(c) for c in array.chunks[y:])

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        if self._channel_first:
            block = np.asarray(self._array[(*self._lead, slice(None), ys, xs)])
            return np.moveaxis(block, 0, -1)
        return np.asarray(self._array[(*self._lead, ys, xs)])


class _OpenSlideLevel:
    """One OpenSlide level as an (H, W, 3)-indexable array; empty (transparent) areas are the background."""

    def __init__(self, osr, level: int):
        self._osr = osr
        self._level = level
        self._downsample = float(osr.level_downsamples[level])
        props = osr.properties
        tile_w = int(props.get(f"openslide.level[{level}].tile-width", _OPENSLIDE_DEFAULT_TILE_PX))
        tile_h = int(props.get(f"openslide.level[{level}].tile-height", _OPENSLIDE_DEFAULT_TILE_PX))
        self.chunks = (tile_h, tile_w, 3)
        colour = props.get("openslide.background-color") or "FFFFFF"
        self._background = np.array([int(colour[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        # OpenSlide takes the top-left corner in level-0 pixels and the size in pixels of the level
        location = (int(round(xs.start * self._downsample)), int(round(ys.start * self._downsample)))
        rgba = np.asarray(self._osr.read_region(location, self._level, (xs.stop - xs.start, ys.stop - ys.start)))
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        a = alpha.astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * a + self._background * (1.0 - a)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class Slide:
    """A pyramidal RGB slide. ``um_per_px`` overrides what the file says (µm per level-0 pixel).

    ``backend``: "auto" (by content: OME-TIFF, SVS and plain TIFFs through tifffile, scanner formats
    OpenSlide recognises through OpenSlide), or "tifffile" / "openslide" to force one.
    """

    def __init__(self, path: str | Path, um_per_px: float | None = None, backend: str = "auto"):
        self.path = Path(path)
        if backend not in BACKENDS:
            raise InputError(self.path, "backend", f"one of {BACKENDS}", backend)
        if not self.path.is_file():
            raise InputError(
                self.path, None, "an existing slide file (OME-TIFF, SVS or a format OpenSlide reads)", "no such file"
            )
        self._tif: tifffile.TiffFile | None = None
        self._osr = None
        self.vendor: str | None = None
        self._arrays: dict[int, _TiffLevel | _OpenSlideLevel] = {}
        tiff_problem = None
        if backend in ("auto", "tifffile"):
            tiff_problem = self._open_tifffile(forced=backend == "tifffile")
        if self._tif is None:
            self._open_openslide(tiff_problem, forced=backend == "openslide")
        self.backend = "tifffile" if self._tif is not None else "openslide"
        file_um_per_px, field = self._file_um_per_px()
        self.um_per_px = um_per_px or file_um_per_px
        if self.um_per_px is None or not np.isfinite(self.um_per_px) or self.um_per_px <= 0:
            raise InputError(
                self.path,
                field,
                "a positive pixel size in the metadata (or um_per_px in the config)",
                self.um_per_px,
            )

    # -- opening --------------------------------------------------------------------------------

    def _open_tifffile(self, forced: bool) -> str | None:
        """Open through tifffile when the file holds a usable RGB pyramid; else say why not (None: opened).

        A file that starts like a TIFF but that tifffile cannot walk to its end is refused here as
        truncated or corrupt: every later symptom (lost OME metadata, missing tiles) would mislead.
        """
        if not _is_tiff(self.path):
            if forced:
                raise InputError(self.path, None, "a TIFF file (backend tifffile)", "no TIFF header")
            return "not a TIFF"
        try:
            tif, levels = self._walk_tiff()
        except InputError:
            if self.path.suffix.lower() != ".ndpi":
                raise
            # tifffile takes a classic TIFF named .ndpi for NDPI (64-bit offsets) by the name alone
            tif, levels = self._walk_tiff(is_ndpi=False)
        vendor_file = tif.is_ndpi or tif.is_philips or tif.is_scn or tif.is_bif
        if not forced and vendor_file and not (tif.is_ome or tif.is_svs) and self._openslide_vendor() is not None:
            tif.close()  # OpenSlide knows this scanner's layout and pixel size
            return "a scanner format OpenSlide reads"
        try:
            self.levels, self._axes, self._channel_axis = self._tiff_layout(levels)
        except InputError:
            tif.close()
            if forced or self._openslide_vendor() is None:
                raise
            return f"series axes {levels[0].axes}"
        self._tif = tif
        return None

    def _walk_tiff(self, **flags) -> tuple[tifffile.TiffFile, list]:
        """Open the TIFF and its first series' levels, checking that every IFD, tag and tile is in the file."""
        with _tifffile_errors() as errors:
            try:
                tif = tifffile.TiffFile(self.path, **flags)
            except Exception as exc:
                raise _truncated(self.path, f"{type(exc).__name__}: {exc}") from exc
            try:
                levels = list(tif.series[0].levels)
                size = tif.filehandle.size
                ends = [
                    max((o + n for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)
                    for level in levels
                    for page in level.pages
                    if page is not None
                ]
            except Exception as exc:
                tif.close()
                raise _truncated(self.path, f"{type(exc).__name__}: {exc}") from exc
        damaged = [m for m in errors if "offset" in m.lower()]
        if damaged or (ends and max(ends) > size):
            tif.close()
            detail = damaged[0] if damaged else f"image data runs to byte {max(ends)} of a {size}-byte file"
            raise _truncated(self.path, detail)
        return tif, levels

    def _tiff_layout(self, levels) -> tuple[list[tuple[int, int]], str, int | None]:
        """(height, width) per level, the level-0 axes and the colour-plane axis (None: interleaved)."""
        shapes = []
        for level in levels:
            shape = dict(zip(level.axes, level.shape))
            if "Y" not in shape or "X" not in shape:
                raise InputError(self.path, "axes", "an image with Y and X axes", level.axes)
            shapes.append((int(shape["Y"]), int(shape["X"])))
        axes = levels[0].axes
        if axes in ("YXS", "YX") or axes.endswith("YXS"):
            return shapes, axes, None
        if len(axes) >= 3 and axes.endswith("YX") and axes[-3] in "CS":
            n_channels = levels[0].shape[-3]
            if n_channels not in (1, 3, 4):
                raise InputError(
                    self.path, "axes", "RGB pixels: 3 colour planes (CYX / SYX), or 1 grey", f"{axes} {levels[0].shape}"
                )
            return shapes, axes, len(axes) - 3
        raise InputError(self.path, "axes", "RGB pixels stored as YXS, CYX or SYX", axes)

    def _openslide_vendor(self) -> str | None:
        """OpenSlide's name for the format (None: not one OpenSlide reads, or OpenSlide missing)."""
        if openslide is None:
            return None
        vendor = openslide.OpenSlide.detect_format(str(self.path))
        return None if vendor in _OPENSLIDE_GENERIC else vendor

    def _open_openslide(self, tiff_problem: str | None, forced: bool) -> None:
        expected = "a pyramidal slide: OME-TIFF, SVS or a format OpenSlide reads"
        if openslide is None:
            raise InputError(self.path, None, f"{expected} (pip install openslide-python openslide-bin)", tiff_problem)
        vendor = openslide.OpenSlide.detect_format(str(self.path))
        if vendor is None or (vendor in _OPENSLIDE_GENERIC and not forced):
            raise InputError(self.path, None, expected, f"tifffile: {tiff_problem}; OpenSlide: format not recognised")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except Exception as exc:
            found = f"{type(exc).__name__}: {exc}"
            raise InputError(self.path, None, f"a {vendor} slide OpenSlide can open", found) from exc
        self.vendor = vendor
        self.levels = [(int(h), int(w)) for w, h in self._osr.level_dimensions]

    def _file_um_per_px(self) -> tuple[float | None, str]:
        if self._tif is not None:
            return _ome_um_per_px(self._tif) or _svs_um_per_px(self._tif), "PhysicalSizeX / MPP"
        props = self._osr.properties
        mpp_x, mpp_y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        if mpp_x and mpp_y and abs(float(mpp_x) - float(mpp_y)) > 0.01 * float(mpp_x):
            log.warning("%s: non-square pixels (%s x %s µm); using the x size", self.path, mpp_x, mpp_y)
        return (float(mpp_x) if mpp_x else None), "openslide.mpp-x"

    # -- reading --------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0 in pixels."""
        return self.levels[0]

    def downsample(self, level: int) -> float:
        """Level-0 pixels per pixel of ``level`` (along x)."""
        return self.levels[0][1] / self.levels[level][1]

    def _array(self, level: int) -> _TiffLevel | _OpenSlideLevel:
        """``level`` as an (H, W, 3)-indexable array whose ``chunks[:2]`` are the stored tile (height, width)."""
        if level not in self._arrays:
            if self._tif is not None:
                store = self._tif.aszarr(series=0, level=level)
                self._arrays[level] = _TiffLevel(zarr.open(store, mode="r"), self._axes, self._channel_axis)
            else:
                self._arrays[level] = _OpenSlideLevel(self._osr, level)
        return self._arrays[level]

    def tile_hw(self, level: int) -> tuple[int, int]:
        """(height, width) of one stored tile (or strip) at ``level``: the unit the decoder works in."""
        chunks = self._array(level).chunks
        return int(chunks[0]), int(chunks[1])

    def read_region(self, x0: int, y0: int, width: int, height: int, level: int = 0, fill: int = 255) -> np.ndarray:
        """uint8 (height, width, 3) RGB; parts outside the slide are ``fill`` (white, like glass)."""
        h, w = self.levels[level]
        out = np.full((height, width, 3), fill, dtype=np.uint8)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + width, w), min(y0 + height, h)
        if xa >= xb or ya >= yb:
            return out
        try:
            block = np.asarray(self._array(level)[slice(ya, yb), slice(xa, xb)])
        except Exception as exc:
            raise InputError(
                self.path,
                f"level {level} region x={xa}:{xb} y={ya}:{yb}",
                "decodable image tiles",
                f"{type(exc).__name__}: {exc}",
            ) from exc
        if block.ndim == 2:
            block = np.repeat(block[..., None], 3, axis=2)
        elif block.shape[2] == 1:
            block = np.repeat(block, 3, axis=2)
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = block[..., :3]
        return out

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for i in range(len(self.levels)):
            if self.downsample(i) <= downsample * 1.0001:
                best = i
        return best

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """A whole-slide RGB image no larger than ``max_side`` and its downsample from level 0."""
        h0, w0 = self.levels[0]
        wanted = max(h0, w0) / max_side
        level = self.best_level(max(wanted, 1.0))
        h, w = self.levels[level]
        try:
            image = self.read_region(0, 0, w, h, level=level)
        except InputError:
            image = self._read_skipping_bad_tiles(level)
        factor = max(1, int(np.ceil(max(h, w) / max_side)))
        if factor > 1:
            image = image[::factor, ::factor]
        return image, self.downsample(level) * factor

    def _read_skipping_bad_tiles(self, level: int, block: int = 512, fill: int = 128) -> np.ndarray:
        """A whole level read block by block; undecodable blocks become grey and are logged."""
        h, w = self.levels[level]
        image = np.full((h, w, 3), fill, dtype=np.uint8)
        bad = 0
        for y0 in range(0, h, block):
            for x0 in range(0, w, block):
                bh, bw = min(block, h - y0), min(block, w - x0)
                try:
                    image[y0 : y0 + bh, x0 : x0 + bw] = self.read_region(x0, y0, bw, bh, level=level)
                except InputError:
                    bad += 1
        log.warning(
            "%s: %d unreadable %d px blocks at level %d shown grey in the thumbnail", self.path, bad, block, level
        )
        return image

    def close(self) -> None:
        self._arrays.clear()
        if self._tif is not None:
            self._tif.close()
        if self._osr is not None:
            self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

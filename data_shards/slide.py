"""Region access to pyramidal whole-slide TIFFs (OME-TIFF, Aperio SVS) without reading them whole.

Pixels are fetched through tifffile's zarr interface, so only the JPEG tiles that overlap a
requested region are decoded. Coordinates are (x, y) in pixels of the requested pyramid level;
level 0 is full resolution at ``um_per_px`` µm/pixel.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile
import zarr

from common.errors import InputError

log = logging.getLogger(__name__)

_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


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


class Slide:
    """A pyramidal RGB slide. ``um_per_px`` overrides what the file says (µm per level-0 pixel)."""

    def __init__(self, path: str | Path, um_per_px: float | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, None, "an existing slide file (OME-TIFF or SVS)", "no such file")
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
        except Exception as exc:
            raise InputError(self.path, None, "a readable TIFF slide", f"{type(exc).__name__}: {exc}") from exc
        self._series = series
        self.levels: list[tuple[int, int]] = []
        for level in series.levels:
            axes = level.axes
            shape = dict(zip(axes, level.shape))
            if "Y" not in shape or "X" not in shape:
                raise InputError(self.path, "axes", "an image with Y and X axes", axes)
            self.levels.append((int(shape["Y"]), int(shape["X"])))
        axes0 = series.levels[0].axes
        if axes0 not in ("YXS", "YX") and not axes0.endswith("YXS"):
            raise InputError(self.path, "axes", "RGB pixels stored as YXS", axes0)
        self.um_per_px = um_per_px or _ome_um_per_px(self._tif) or _svs_um_per_px(self._tif)
        if self.um_per_px is None or not np.isfinite(self.um_per_px) or self.um_per_px <= 0:
            raise InputError(
                self.path,
                "PhysicalSizeX / MPP",
                "a positive pixel size in the metadata (or um_per_px in the config)",
                self.um_per_px,
            )
        self._arrays: dict[int, zarr.Array] = {}

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0 in pixels."""
        return self.levels[0]

    def downsample(self, level: int) -> float:
        """Level-0 pixels per pixel of ``level`` (along x)."""
        return self.levels[0][1] / self.levels[level][1]

    def _array(self, level: int) -> zarr.Array:
        if level not in self._arrays:
            store = self._tif.aszarr(series=0, level=level)
            self._arrays[level] = zarr.open(store, mode="r")
        return self._arrays[level]

    def read_region(self, x0: int, y0: int, width: int, height: int, level: int = 0, fill: int = 255) -> np.ndarray:
        """uint8 (height, width, 3) RGB; parts outside the slide are ``fill`` (white, like glass)."""
        h, w = self.levels[level]
        out = np.full((height, width, 3), fill, dtype=np.uint8)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + width, w), min(y0 + height, h)
        if xa >= xb or ya >= yb:
            return out
        try:
            block = np.asarray(self._array(level)[ya:yb, xa:xb])
        except Exception as exc:
            raise InputError(
                self.path,
                f"level {level} region x={xa}:{xb} y={ya}:{yb}",
                "decodable image tiles",
                f"{type(exc).__name__}: {exc}",
            ) from exc
        if block.ndim == 2:
            block = np.repeat(block[..., None], 3, axis=2)
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
        self._tif.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

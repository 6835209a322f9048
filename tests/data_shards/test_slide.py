"""Slides as users bring them, on files the tests write: the same pixels whatever the layout or backend.

- An Aperio-style SVS (tiled JPEG pyramid, ``MPP = 0.499`` in its ImageDescription) read through
  tifffile and through OpenSlide: same levels, same µm/px, same pixels (JPEG decoders may differ
  by a grey level or two), and the per-slide µm/px override wins in both.
- The same pixels stored as an OME-TIFF interleaved (``YXS``), channel-first (``CYX``, one plane per
  channel) and planar RGB (``SYX``): identical regions and identical cell crops.
- The backend is chosen by content: a TIFF renamed ``.ndpi`` stays with tifffile; a file only
  OpenSlide recognises goes to OpenSlide (a mocked one: no test can write MIRAX or DICOM-WSI).
- A truncated TIFF is refused as truncated, naming the file, never as a missing pixel size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import data_shards.slide as slide_module
from common.errors import InputError
from data_shards.crops import CropReader
from data_shards.slide import Slide

openslide = pytest.importorskip("openslide")

TILE = 128
UM_PER_PX = 0.5
DEMO_SVS = Path(__file__).resolve().parents[2] / ".cache" / "he" / "cmu_small_region.svs"


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour waves plus noise: H&E-like content that JPEG keeps close to the original."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack(
        [128 + 100 * np.sin(x / 37 + y / 53), 128 + 90 * np.cos(y / 29), 128 + 80 * np.sin((x + y) / 41)], axis=-1
    )
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def halve(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:h:2, :w:2].copy()


def write_svs(path: Path, image: np.ndarray, mpp: float = 0.499, n_levels: int = 3) -> Path:
    """Aperio layout: tiled JPEG level 0, a stripped thumbnail, then the tiled reduced levels, all in one IFD chain."""
    h, w = image.shape[:2]
    header = f"Aperio Image Library v12.0.0 \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q=90"
    levels = [image]
    for _ in range(n_levels - 1):
        levels.append(halve(levels[-1]))
    tiled = dict(tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": 90}, metadata=None)
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], description=f"{header}|AppMag = 20|MPP = {mpp}", **tiled)
        thumb = halve(levels[-1])
        tif.write(thumb, photometric="rgb", compression="jpeg", metadata=None, description=f"{header} -> thumb")
        for level in levels[1:]:
            tif.write(level, description=f"{header} -> {level.shape[1]}x{level.shape[0]}", **tiled)
    return path


def write_ome(path: Path, image: np.ndarray, layout: str, n_levels: int = 3) -> Path:
    """Lossless pyramidal OME-TIFF (levels in SubIFDs) with the RGB pixels stored as ``layout``."""
    meta = {"axes": layout, "PhysicalSizeX": UM_PER_PX, "PhysicalSizeY": UM_PER_PX}
    photometric = "minisblack" if layout == "CYX" else "rgb"
    options = dict(tile=(TILE, TILE), compression="zlib", photometric=photometric)
    if layout == "SYX":
        options["planarconfig"] = "separate"
    levels = [image]
    for _ in range(n_levels - 1):
        levels.append(halve(levels[-1]))
    with tifffile.TiffWriter(path, ome=True) as tif:
        for k, level in enumerate(levels):
            data = level if layout == "YXS" else np.ascontiguousarray(np.moveaxis(level, -1, 0))
            extra = dict(subifds=n_levels - 1, metadata=meta) if k == 0 else dict(subfiletype=1)
            tif.write(data, **options, **extra)
    return path


REGIONS = [(0, 0, 200, 150), (333, 271, 224, 224), (-40, -25, 180, 160), (700, 500, 300, 300)]


@pytest.fixture(scope="module")
def svs(tmp_path_factory) -> Path:
    return write_svs(tmp_path_factory.mktemp("svs") / "slide.svs", textured_image(900, 1100))


@pytest.fixture(scope="module")
def ome_trio(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ome")
    image = np.random.default_rng(5).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    return {layout: write_ome(folder / f"{layout}.ome.tif", image, layout) for layout in ("YXS", "CYX", "SYX")}


def test_svs_reads_the_same_through_tifffile_and_openslide(svs):
    with Slide(svs) as by_tifffile, Slide(svs, backend="openslide") as by_openslide:
        assert by_tifffile.backend == "tifffile" and by_openslide.backend == "openslide"
        assert by_openslide.vendor == "aperio"
        assert by_tifffile.levels == by_openslide.levels == [(900, 1100), (450, 550), (225, 275)]
        assert by_tifffile.um_per_px == by_openslide.um_per_px == pytest.approx(0.499)
        assert by_openslide.tile_hw(0) == by_tifffile.tile_hw(0) == (TILE, TILE)
        for level in range(3):
            for x0, y0, w, h in REGIONS:
                a = by_tifffile.read_region(x0 // 2**level, y0 // 2**level, w, h, level=level).astype(int)
                b = by_openslide.read_region(x0 // 2**level, y0 // 2**level, w, h, level=level).astype(int)
                assert a.shape == b.shape == (h, w, 3)
                assert np.abs(a - b).mean() <= 2.0, (level, x0, y0)
        # a region off the slide is white glass in both
        assert (by_openslide.read_region(1050, 880, 100, 100)[60:, 60:] == 255).all()
        thumb_a, ds_a = by_tifffile.thumbnail(300)
        thumb_b, ds_b = by_openslide.thumbnail(300)
        assert ds_a == ds_b and thumb_a.shape == thumb_b.shape
        assert np.abs(thumb_a.astype(int) - thumb_b).mean() <= 2.0
        # the same crops around cells
        centres = np.array([[100.5, 80.0], [550.0, 450.0], [1090.0, 10.0], [640.2, 777.7]])
        for target in (None, 1.0):
            crops_a = dict(CropReader(by_tifffile, crop_size_px=96, target_um_per_px=target).iter_crops(centres))
            crops_b = dict(CropReader(by_openslide, crop_size_px=96, target_um_per_px=target).iter_crops(centres))
            assert crops_a.keys() == crops_b.keys() == set(range(len(centres)))
            for i in crops_a:
                assert np.abs(crops_a[i].astype(int) - crops_b[i]).mean() <= 2.0


def test_um_per_px_override_wins_in_both_backends(svs):
    for backend in ("tifffile", "openslide"):
        with Slide(svs, um_per_px=0.25, backend=backend) as slide:
            assert slide.um_per_px == 0.25


@pytest.mark.skipif(not DEMO_SVS.is_file(), reason="demo slide not fetched (make demo fetches it)")
def test_demo_svs_is_identical_through_both_backends():
    """A real Aperio scan (CMU-1-Small-Region): both decoders give the very same pixels."""
    with Slide(DEMO_SVS) as a, Slide(DEMO_SVS, backend="openslide") as b:
        assert a.backend == "tifffile" and a.levels == b.levels and a.um_per_px == b.um_per_px == 0.499
        for x0, y0, w, h in [(0, 0, 300, 200), (1000, 1500, 224, 224), (2100, 2900, 300, 300)]:
            np.testing.assert_array_equal(a.read_region(x0, y0, w, h), b.read_region(x0, y0, w, h))


def test_channel_first_and_planar_ome_tiff_read_like_interleaved(ome_trio):
    with Slide(ome_trio["YXS"]) as reference:
        centres = np.array([[5.0, 5.0], [450.0, 350.0], [899.0, 699.0], [123.4, 567.8]])
        expected_crops = {
            target: dict(CropReader(reference, crop_size_px=64, target_um_per_px=target).iter_crops(centres))
            for target in (None, 1.0, 0.8)
        }
        for layout in ("CYX", "SYX"):
            with Slide(ome_trio[layout]) as slide:
                assert slide.levels == reference.levels and slide.um_per_px == reference.um_per_px == UM_PER_PX
                assert slide.tile_hw(0) == (TILE, TILE)
                for level in range(3):
                    for region in REGIONS:
                        np.testing.assert_array_equal(
                            slide.read_region(*region, level=level), reference.read_region(*region, level=level)
                        )
                np.testing.assert_array_equal(slide.thumbnail(256)[0], reference.thumbnail(256)[0])
                for target, expected in expected_crops.items():
                    crops = dict(CropReader(slide, crop_size_px=64, target_um_per_px=target).iter_crops(centres))
                    assert crops.keys() == expected.keys()
                    for i in crops:
                        np.testing.assert_array_equal(crops[i], expected[i])


def test_multichannel_fluorescence_is_not_taken_for_rgb(tmp_path):
    planes = np.zeros((5, 64, 64), np.uint8)
    path = tmp_path / "if.ome.tif"
    tifffile.imwrite(path, planes, ome=True, photometric="minisblack", metadata={"axes": "CYX", "PhysicalSizeX": 0.5})
    with pytest.raises(InputError, match="3 colour planes") as info:
        Slide(path)
    assert info.value.path == str(path)


def test_backend_is_chosen_by_content_not_extension(tmp_path, svs, ome_trio):
    ome_as_ndpi = tmp_path / "scan.ndpi"
    shutil.copy(ome_trio["CYX"], ome_as_ndpi)
    svs_as_mrxs = tmp_path / "scan.mrxs"
    shutil.copy(svs, svs_as_mrxs)
    with Slide(ome_as_ndpi) as a, Slide(ome_trio["CYX"]) as b:
        assert a.backend == "tifffile"
        np.testing.assert_array_equal(a.read_region(*REGIONS[1]), b.read_region(*REGIONS[1]))
    with Slide(svs_as_mrxs) as a, Slide(svs) as b:
        assert a.backend == "tifffile" and a.um_per_px == pytest.approx(0.499)
        np.testing.assert_array_equal(a.read_region(*REGIONS[1]), b.read_region(*REGIONS[1]))
    not_a_slide = tmp_path / "slide.svs"
    not_a_slide.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(InputError, match="OpenSlide: format not recognised") as info:
        Slide(not_a_slide)
    assert info.value.path == str(not_a_slide)
    with pytest.raises(InputError, match="backend"):
        Slide(svs, backend="bioformats")


class FakeOpenSlide:
    """What openslide-python gives for a MIRAX slide: levels, properties, RGBA regions at level-0 locations."""

    calls: list = []

    def __init__(self, path: str):
        rng = np.random.default_rng(11)
        self.level0 = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
        self.level_dimensions = ((600, 400), (300, 200))
        self.level_downsamples = (1.0, 2.0)
        self.properties = {
            "openslide.vendor": "mirax",
            "openslide.mpp-x": "0.2431",
            "openslide.mpp-y": "0.2431",
            "openslide.level[0].tile-width": "512",
            "openslide.level[0].tile-height": "256",
        }

    @staticmethod
    def detect_format(path: str) -> str | None:
        return "mirax" if str(path).endswith(".mrxs") else None

    def read_region(self, location, level, size):
        FakeOpenSlide.calls.append((location, level, size))
        step = 2**level
        x, y = location[0] // step, location[1] // step  # OpenSlide: location in level-0 pixels
        pixels = self.level0[::step, ::step][y : y + size[1], x : x + size[0]]
        alpha = np.full(pixels.shape[:2] + (1,), 255, np.uint8)
        alpha[:4, :4] = 0  # an empty (transparent) corner: glass
        return Image.fromarray(np.concatenate([pixels, alpha], axis=2), "RGBA")

    def close(self):
        pass


def test_format_only_openslide_reads_goes_to_openslide(tmp_path, monkeypatch):
    fake = type("openslide", (), {"OpenSlide": FakeOpenSlide})
    monkeypatch.setattr(slide_module, "openslide", fake)
    path = tmp_path / "scan.mrxs"
    path.write_bytes(b"not a TIFF: MIRAX index")
    FakeOpenSlide.calls = []
    with Slide(path) as slide:
        assert slide.backend == "openslide" and slide.vendor == "mirax"
        assert slide.levels == [(400, 600), (200, 300)] and slide.um_per_px == pytest.approx(0.2431)
        assert slide.tile_hw(0) == (256, 512)
        level0 = FakeOpenSlide(str(path)).level0
        region = slide.read_region(100, 50, 40, 30, level=1)
        assert FakeOpenSlide.calls[-1] == ((200, 100), 1, (40, 30))
        np.testing.assert_array_equal(region[4:, 4:], level0[::2, ::2][54:80, 104:140])
        assert (region[:4, :4] == 255).all()  # transparent pixels become white glass
    with Slide(path, um_per_px=0.5) as slide:
        assert slide.um_per_px == 0.5


def test_openslide_slide_without_pixel_size_names_the_property(tmp_path, monkeypatch):
    class NoMpp(FakeOpenSlide):
        def __init__(self, path):
            super().__init__(path)
            self.properties = {"openslide.vendor": "mirax"}

    monkeypatch.setattr(slide_module, "openslide", type("openslide", (), {"OpenSlide": NoMpp}))
    path = tmp_path / "scan.mrxs"
    path.write_bytes(b"MIRAX")
    with pytest.raises(InputError, match="openslide.mpp-x"):
        Slide(path)
    with Slide(path, um_per_px=0.25) as slide:
        assert slide.um_per_px == 0.25


@pytest.mark.parametrize("keep", [0.999, 0.6, 0.05, 0.0005])
@pytest.mark.parametrize("kind", ["ome", "svs"])
def test_truncated_tiff_is_reported_as_truncated(tmp_path, svs, ome_trio, kind, keep):
    source = ome_trio["YXS"] if kind == "ome" else svs
    data = source.read_bytes()
    cut = tmp_path / source.name
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(InputError) as info:
        Slide(cut)
    message = str(info.value)
    assert info.value.path == str(cut)
    assert "a complete TIFF" in message and "truncated or corrupt" in message, message
    assert "pixel size" not in message and "PhysicalSize" not in message


def test_tile_data_past_the_end_is_truncation(tmp_path):
    """A cut that leaves every IFD intact (plain TIFF, tags first) still shows: tiles run past the end."""
    path = tmp_path / "plain.tif"
    image = textured_image(600, 600)
    tifffile.imwrite(path, image, tile=(TILE, TILE), photometric="rgb", compression="zlib", description="MPP = 0.5")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError, match=r"image data runs to byte \d+ of a \d+-byte file"):
        Slide(path)


def test_ome_tiff_cut_inside_its_metadata_is_truncation(tmp_path, ome_trio):
    """tifffile writes the OME-XML last: a cut there loses only the metadata (and with it the pixel size)."""
    source = ome_trio["YXS"]
    with tifffile.TiffFile(source) as tif:
        xml_at = tif.pages[0].tags["ImageDescription"].valueoffset
        pages = [page for level in tif.series[0].levels for page in level.pages]
        tiles_end = max(o + n for page in pages for o, n in zip(page.dataoffsets, page.databytecounts))
    assert xml_at >= tiles_end  # every tile survives the cut below
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(source.read_bytes()[: xml_at + 100])
    with pytest.raises(InputError, match="truncated or corrupt: .*invalid value offset"):
        Slide(cut)

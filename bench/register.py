"""Time of the automatic registration route (``register.keypoints: auto``) on the demo slide and on a
procedural section of about 1.5 cm².

    python bench/register.py [--side-mm 12.25] [--out runs/bench/register] [--skip-demo] [--record]

Demo: the demo bundle (``runs/demo/bundle``, made if missing) registered from its hand keypoints and
automatically; the time of each route and the error at the cells against the planted map.

Section: a square section of ``--side-mm``² (12.25 mm: 1.5 cm², a typical Xenium region) written as
the two files the automatic route reads, from one set of nuclei: the Xenium DAPI morphology image
(uint16 pyramidal OME-TIFF at 0.2125 µm/px, 57,600 px a side at level 0) and the H&E (JPEG pyramidal
OME-TIFF at 0.5 µm/px), the H&E placed by a planted similarity plus a smooth deformation. Both are
rendered at an intermediate resolution and interpolated up to level 0 (the automatic route never
reads level 0 of the DAPI image; its pyramid is written for the file's size and layout). The timed
part is :func:`data_shards.register.find_keypoints` (coarse search, both tile passes, robust fit);
the per-region fit and QC that follow are the hand route's, timed on the demo. ``--record`` appends
the figures to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage as ndi
from skimage.color import rgb_from_hed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.logs import setup_logging  # noqa: E402
from data_shards.ome_tiff import pyramid_shapes, tile_grid, write_pyramidal_ome_tiff  # noqa: E402
from data_shards.register import Registration, find_keypoints, register_bundle  # noqa: E402
from data_shards.slide import Slide  # noqa: E402
from data_shards.synthetic import DEFAULT_SLIDE, make_bundle  # noqa: E402

PIXEL_SIZE_UM = 0.2125  # Xenium morphology µm/px
HE_UM_PER_PX = 0.5
DAPI_MID = 4  # the DAPI image is rendered at level 2 (0.85 µm/px), ×4 up to level 0
HE_MID = 2  # the H&E at 1 µm/px, ×2 up to level 0
TILE = 1024
DEMO_SETTINGS = {"n_regions": 4, "blend": True, "max_rms_um": 5.0, "max_loo_um": 10.0}


# ---------------------------------------------------------------------------------------------
# The procedural section
# ---------------------------------------------------------------------------------------------


def nuclei_um(rng: np.random.Generator, side_um: float, per_mm2: float = 3000.0) -> np.ndarray:
    """(n, 2) µm nucleus centres on an irregular tissue with smoothly varying density."""
    field_px = 256
    noise = ndi.gaussian_filter(rng.standard_normal((field_px, field_px)), 12, mode="wrap")
    noise = (noise - noise.mean()) / noise.std()
    yy, xx = (np.mgrid[0:field_px, 0:field_px] + 0.5) / field_px - 0.5
    envelope = 1.0 - (np.abs(xx * 2.1) ** 3 + np.abs(yy * 2.3) ** 3)
    tissue = (envelope + 0.25 * noise) > 0.15
    density = np.where(tissue, np.clip(0.55 + 0.35 * noise, 0.1, 1.0), 0.0)
    n = rng.poisson(per_mm2 * (side_um / 1000) ** 2)
    xy = rng.uniform(0, side_um, size=(n, 2))
    cell = np.minimum((xy / side_um * field_px).astype(int), field_px - 1)
    keep = rng.uniform(size=n) < density[cell[:, 1], cell[:, 0]]
    return xy[keep]


def planted(side_um: float, rng: np.random.Generator):
    """Xenium µm -> H&E px: rotation, 2 px/µm, translation, smooth RBF deformation (≤ ~15 µm)."""
    angle = np.deg2rad(rng.uniform(5, 15))
    scale = 1.0 / HE_UM_PER_PX
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre_um = np.array([side_um / 2, side_um / 2])
    out_side_px = 2 * int(side_um * scale * 0.65)  # room for the rotated section (cos 15° + sin 15° = 1.22)
    translation = np.full(2, out_side_px / 2) - rot @ centre_um
    centres = rng.uniform(0, side_um, size=(4, 2))
    amplitudes = rng.normal(size=(4, 2)) * 6.0 * scale  # px
    sigma = 0.3 * side_um

    def to_he_px(xy_um: np.ndarray) -> np.ndarray:
        d2 = ((xy_um[:, None] - centres[None]) ** 2).sum(axis=2)
        shift = (np.exp(-d2 / (2 * sigma**2))[:, :, None] * amplitudes[None]).sum(axis=1)
        return xy_um @ rot.T + translation + shift

    return to_he_px, (out_side_px, out_side_px), float(np.rad2deg(angle))


def splat(shape_hw: tuple[int, int], xy_px: np.ndarray, sigma_px: float, weights: np.ndarray) -> np.ndarray:
    """Gaussian blobs of the given weights at (n, 2) px positions (bilinear splat, then one Gaussian filter)."""
    image = np.zeros(shape_hw, np.float32)
    x0, y0 = np.floor(xy_px[:, 0]).astype(int), np.floor(xy_px[:, 1]).astype(int)
    fx, fy = xy_px[:, 0] - x0, xy_px[:, 1] - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xs, ys = x0 + dx, y0 + dy
        ok = (xs >= 0) & (ys >= 0) & (xs < shape_hw[1]) & (ys < shape_hw[0])
        np.add.at(image, (ys[ok], xs[ok]), (w * weights)[ok].astype(np.float32))
    return ndi.gaussian_filter(image, sigma_px) * np.float32(2 * np.pi * sigma_px**2)


def halve(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[0] // 2, image.shape[1] // 2
    return image[: 2 * h, : 2 * w].reshape(h, 2, w, 2, *image.shape[2:]).mean(axis=(1, 3)).astype(image.dtype)


def level_tiles(mid: np.ndarray, mid_level: int, level: int, shape: tuple[int, int], cache: dict):
    """Tiles (row-major) of pyramid ``level``, from the image rendered at ``mid_level``: zoomed up below it,
    box-averaged above it."""
    image = level_tiles_image(mid, mid_level, level, cache) if level >= mid_level else None
    factor = 2 ** (mid_level - level) if level < mid_level else 1
    for y0, x0 in tile_grid(*shape, TILE):
        if image is not None:
            block = image[y0 : y0 + TILE, x0 : x0 + TILE]
        else:  # bilinear zoom of the matching part of the rendered level
            ys = (np.arange(y0, y0 + TILE) + 0.5) / factor - 0.5
            xs = (np.arange(x0, x0 + TILE) + 0.5) / factor - 0.5
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            if mid.ndim == 3:
                block = np.stack(
                    [ndi.map_coordinates(mid[..., c], [yy, xx], order=1, mode="nearest") for c in range(3)], axis=-1
                )
            else:
                block = ndi.map_coordinates(mid, [yy, xx], order=1, mode="nearest")
            block = block.astype(mid.dtype)
        full = np.zeros((TILE, TILE, *mid.shape[2:]), mid.dtype)
        full[: block.shape[0], : block.shape[1]] = block
        yield full


def level_tiles_image(mid: np.ndarray, mid_level: int, level: int, cache: dict) -> np.ndarray:
    if level == mid_level:
        return mid
    if level not in cache:
        cache[level] = halve(level_tiles_image(mid, mid_level, level - 1, cache))
    return cache[level]


def write_dapi(path: Path, mid: np.ndarray, shape0: tuple[int, int]) -> None:
    """uint16 pyramidal OME-TIFF as XOA writes the morphology focus image (levels in SubIFDs)."""
    shapes = pyramid_shapes(*shape0)
    cache: dict = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    common = dict(tile=(TILE, TILE), compression="zlib", compressionargs={"level": 1}, dtype=np.uint16)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for level, shape in enumerate(shapes):
            tiles = level_tiles(mid, 2, level, shape, cache)
            if level == 0:
                tif.write(
                    tiles,
                    shape=shape,
                    subifds=len(shapes) - 1,
                    metadata={
                        "axes": "YX",
                        "Channel": {"Name": ["DAPI"]},
                        "PhysicalSizeX": PIXEL_SIZE_UM,
                        "PhysicalSizeY": PIXEL_SIZE_UM,
                    },
                    **common,
                )
            else:
                tif.write(tiles, shape=shape, subfiletype=1, metadata=None, **common)


def make_section(folder: Path, side_mm: float, seed: int = 0) -> dict:
    """DAPI + H&E of a procedural square section; returns paths, sizes and the planted map."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    side_um = side_mm * 1000.0
    xy = nuclei_um(rng, side_um)
    to_he_px, he_shape, angle = planted(side_um, rng)
    brightness = rng.uniform(0.4, 1.0, size=len(xy))
    # DAPI at level 2 (0.85 µm/px): blobs of σ 2.5 µm; level 0 is 57,600 px a side for 12.25 mm.
    shape0 = (int(np.ceil(side_um / PIXEL_SIZE_UM)),) * 2
    mid_shape = (shape0[0] // DAPI_MID, shape0[1] // DAPI_MID)
    mid_um = PIXEL_SIZE_UM * DAPI_MID
    dapi = splat(mid_shape, xy / mid_um - 0.5, 2.5 / mid_um, brightness)
    dapi *= np.float32(12000)
    dapi += rng.standard_normal(dapi.shape, dtype=np.float32) * np.float32(60) + np.float32(200)
    dapi = np.clip(dapi, 0, 65535).astype(np.uint16)
    dapi_path = folder / "morphology_focus" / "morphology_focus_0000.ome.tif"
    write_dapi(dapi_path, dapi, shape0)
    del dapi
    t_dapi = time.perf_counter() - started
    # H&E at 1 µm/px (level 1), ×2 up to level 0 (0.5 µm/px).
    mid_he = (he_shape[0] // HE_MID, he_shape[1] // HE_MID)
    he_px = to_he_px(xy)
    hema = splat(mid_he, (he_px + 0.5) / HE_MID - 0.5, 2.5 / (HE_UM_PER_PX * HE_MID), brightness * 0.9)
    tissue_px = ndi.gaussian_filter((hema > 0.05).astype(np.float32), 15) > 0.05
    hema += 0.06 * tissue_px
    eosin = rng.standard_normal(mid_he, dtype=np.float32) * np.float32(0.02) + np.float32(0.35) * tissue_px
    del tissue_px
    rgb = np.empty((*mid_he, 3), np.uint8)
    for c in range(3):  # one channel at a time: a (h, w, 3) float image of 17k² px would need 3.6 GB
        od = hema * np.float32(rgb_from_hed[0, c]) + eosin * np.float32(rgb_from_hed[1, c])
        rgb[..., c] = np.clip(255 * np.exp(-od * np.float32(np.log(10))), 0, 255).astype(np.uint8)
    del hema, eosin, od
    cache: dict = {}
    he_path = folder / "he" / "post_xenium_he.ome.tif"
    he_path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_ome_tiff(
        he_path,
        he_shape,
        HE_UM_PER_PX,
        lambda level, shape: level_tiles(rgb, 1, level, shape, cache),
        tile_px=TILE,
        progress=False,
    )
    return {
        "dapi": dapi_path,
        "he": he_path,
        "n_nuclei": len(xy),
        "side_mm": side_mm,
        "dapi_shape": shape0,
        "he_shape": he_shape,
        "rotation_deg": angle,
        "to_he_px": to_he_px,
        "seconds_dapi": t_dapi,
        "seconds_total": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------


def cell_error_um(bundle: Path, registration: Registration) -> float:
    truth = pd.read_parquet(bundle / "ground_truth_cells.parquet")
    mapped = registration.map(truth[["x_um", "y_um"]].to_numpy())
    err = np.linalg.norm(mapped - truth[["he_x_px", "he_y_px"]].to_numpy(), axis=1)
    return float(np.sqrt(np.mean(err**2)) * registration.he_um_per_px)


def bench_demo(out: Path) -> dict:
    bundle = Path("runs/demo/bundle")
    if not (bundle / "morphology_focus").is_dir():
        if not DEFAULT_SLIDE.is_file():
            return {"skipped": f"no demo bundle and no demo slide ({DEFAULT_SLIDE}); run make setup"}
        bundle = out / "demo_bundle"
        make_bundle(bundle, "real", seed=0, write_transcripts=False)
    started = time.perf_counter()
    register_bundle(bundle, out / "demo_hand", DEMO_SETTINGS)
    hand_s = time.perf_counter() - started
    started, cpu = time.perf_counter(), time.process_time()
    report = register_bundle(bundle, out / "demo_auto", {**DEMO_SETTINGS, "keypoints": "auto"})
    auto_s, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "bundle": str(bundle),
        "hand_route_s": hand_s,
        "auto_route_s": auto_s,
        "auto_route_cpu_s": cpu,
        "auto_keypoints_s": report["auto_keypoints"]["seconds"],
        "auto_timings_s": report["auto_keypoints"]["timings_s"],
        "n_auto_keypoints": report["auto_keypoints"]["n_kept"],
        "hand_cell_error_um": cell_error_um(bundle, Registration.from_json(out / "demo_hand" / "registration.json")),
        "auto_cell_error_um": cell_error_um(bundle, Registration.from_json(out / "demo_auto" / "registration.json")),
    }


def bench_section(out: Path, side_mm: float) -> dict:
    folder = out / f"section_{side_mm:g}mm"
    section = make_section(folder, side_mm)
    started, cpu = time.perf_counter(), time.process_time()
    with Slide(section["he"]) as slide:
        found = find_keypoints(section["dapi"], slide, PIXEL_SIZE_UM)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    err = np.linalg.norm(section["to_he_px"](found.fixed_um) - found.moving_px, axis=1) * HE_UM_PER_PX
    return {
        "area_cm2": (side_mm / 10) ** 2,
        "n_nuclei": section["n_nuclei"],
        "dapi_px": section["dapi_shape"],
        "he_px": section["he_shape"],
        "files_written_s": section["seconds_total"],
        "auto_keypoints_s": seconds,
        "auto_keypoints_cpu_s": cpu,
        "timings_s": found.timings_s,
        "n_keypoints": found.n_kept,
        "keypoint_error_um_median": float(np.median(err)),
        "keypoint_error_um_p90": float(np.percentile(err, 90)),
        "rotation_planted_deg": section["rotation_deg"],
        "rotation_found_deg": found.rotation_deg,
    }


def record(demo: dict, section: dict) -> None:
    lines = [
        "",
        f"## bench/register.py — {dt.date.today().isoformat()} ({platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; other processes share the machine)",
        "",
        "Automatic keypoints (`register.keypoints: auto`): targets < 60 s on the demo slide, < 10 min for a "
        "1.5 cm² section on 2 cores.",
        "",
    ]
    if "skipped" in demo:
        lines.append(f"- demo: skipped ({demo['skipped']})")
    else:
        t = demo["auto_timings_s"]
        lines += [
            f"- demo slide: automatic route {demo['auto_route_s']:.1f} s end to end, {demo['auto_route_cpu_s']:.1f} s "
            f"CPU (keypoints "
            f"{demo['auto_keypoints_s']:.1f} s: coarse {t['coarse']:.1f} s, pass 1 {t['pass1']:.1f} s, pass 2 "
            f"{t['pass2']:.1f} s; {demo['n_auto_keypoints']} keypoints); hand route {demo['hand_route_s']:.1f} s",
            f"- demo slide: error at the cells vs the planted map: automatic {demo['auto_cell_error_um']:.2f} µm, "
            f"hand keypoints {demo['hand_cell_error_um']:.2f} µm (4 regions, blended)",
        ]
    t = section["timings_s"]
    lines += [
        f"- procedural section {section['area_cm2']:.2f} cm² ({section['n_nuclei']:,} nuclei; DAPI "
        f"{section['dapi_px'][1]:,}² px at 0.2125 µm/px, H&E {section['he_px'][1]:,}² px at 0.5 µm/px; files "
        f"written in {section['files_written_s']:.0f} s): automatic keypoints {section['auto_keypoints_s']:.1f} s "
        f"wall, {section['auto_keypoints_cpu_s']:.1f} s CPU "
        f"(coarse {t['coarse']:.1f} s, pass 1 {t['pass1']:.1f} s, pass 2 {t['pass2']:.1f} s), "
        f"{section['n_keypoints']} keypoints, error vs the planted map median "
        f"{section['keypoint_error_um_median']:.2f} µm, p90 {section['keypoint_error_um_p90']:.2f} µm; rotation "
        f"{section['rotation_found_deg']:.2f}° found vs {section['rotation_planted_deg']:.2f}° planted "
        "(the planted deformation adds up to ~15 µm locally)",
    ]
    results = Path(__file__).resolve().parent / "RESULTS.md"
    with results.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side-mm", type=float, default=12.25, help="side of the procedural section (mm)")
    parser.add_argument("--out", default="runs/bench/register")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = {"skipped": "--skip-demo"} if args.skip_demo else bench_demo(out)
    print("demo:", demo)
    section = bench_section(out, args.side_mm)
    print("section:", section)
    if args.record:
        record(demo, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

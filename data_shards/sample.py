"""The shard sample: its members, how they are encoded, how they are decoded and checked.

The one owner of the format, used by the shard writer, ``make_shards.py verify``, the training
loader and embedding. A sample is one cell, stored as webdataset tar members ``<key>.<ext>``:

==================  ==========================================================================
``jpg``             the H&E crop centred on the cell, uint8 RGB (H, W, 3), baseline JPEG
``tokens.npy``      int32 (L,): the cell's rank tokens (``data_shards.tokenize``)
``nbr_tokens.npy``  int32 (m, L): the rank tokens of its m ≤ k spatial neighbours
``nbr_offsets.npy`` float32 (m, 2): (dx, dy) µm, neighbour minus centre, along the H&E crop axes
                    (x right, y down), so a flip or rotation of the crop applies to both
``json``            cell id, slide, coordinates (µm and H&E px), registration region, QC
==================  ==========================================================================

Keys must not contain '.' (webdataset splits a member name at its first dot).
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image

from common.errors import InputError

# imagecodecs (libjpeg-turbo) measured fastest for 224 px RGB crops on the build machine:
# encode 0.36 ms vs PIL 0.50 ms vs torchvision 0.95 ms; decode 0.48 / 0.79 / 0.55 ms.
try:
    import imagecodecs

    _HAVE_IMAGECODECS = bool(imagecodecs.JPEG8.available)
except ImportError:  # pragma: no cover - imagecodecs is a declared dependency
    _HAVE_IMAGECODECS = False

SAMPLE_KEYS = ("jpg", "tokens.npy", "nbr_tokens.npy", "nbr_offsets.npy", "json")
_MEMBERS = ", ".join(SAMPLE_KEYS)


class CellArrays(NamedTuple):
    """The cell-tower members of a sample."""

    tokens: np.ndarray  # int32 (L,)
    nbr_tokens: np.ndarray  # int32 (m, L)
    nbr_offsets_um: np.ndarray  # float32 (m, 2), (dx, dy) µm
    meta: dict


class DecodedSample(NamedTuple):
    key: str
    image: np.ndarray  # uint8 (H, W, 3), image[y, x]
    tokens: np.ndarray  # int32 (L,)
    nbr_tokens: np.ndarray  # int32 (m, L)
    nbr_offsets_um: np.ndarray  # float32 (m, 2), (dx, dy) µm
    meta: dict


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_jpeg(crop: np.ndarray, quality: int = 90) -> bytes:
    """uint8 (H, W, 3) RGB -> baseline JPEG bytes (4:2:0 chroma, like PIL's default)."""
    crop = np.ascontiguousarray(crop, dtype=np.uint8)
    if _HAVE_IMAGECODECS:
        return bytes(imagecodecs.jpeg8_encode(crop, level=int(quality)))
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` file of a C-contiguous array (what ``np.save`` writes), with a cached header."""
    array = np.ascontiguousarray(array)
    return _npy_header(array.dtype.str, tuple(array.shape)) + array.tobytes()


# What ``json.dumps(meta, separators=(",", ":"), allow_nan=False)`` builds on every call (json.dumps
# makes a new encoder whenever an option differs from its defaults); same text, made once.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode_sample(
    key: str,
    jpg: bytes,
    tokens: np.ndarray,
    nbr_tokens: np.ndarray,
    nbr_offsets_um: np.ndarray,
    meta: dict,
) -> dict:
    """One shard sample as bytes per member (module docstring).

    tokens (L,) int32; nbr_tokens (m, L) int32 and nbr_offsets_um (m, 2) float32 with m ≤ k real
    neighbours, offsets = neighbour minus centre in µm along the H&E crop axes (x right, y down).
    """
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain '.' (webdataset splits keys at dots)")
    return {
        "__key__": key,
        "jpg": jpg,
        "tokens.npy": npy_bytes(np.ascontiguousarray(tokens, dtype=np.int32)),
        "nbr_tokens.npy": npy_bytes(np.ascontiguousarray(nbr_tokens, dtype=np.int32)),
        "nbr_offsets.npy": npy_bytes(np.ascontiguousarray(nbr_offsets_um, dtype=np.float32)),
        "json": _JSON_ENCODER.encode(meta).encode("utf-8"),
    }


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 (H, W, 3) RGB (libjpeg-turbo through imagecodecs; PIL without it)."""
    if _HAVE_IMAGECODECS:
        image = imagecodecs.jpeg8_decode(data)
    else:
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if image.ndim == 2:  # greyscale JPEG
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def jpeg_decoder(name: str) -> Callable[[bytes], np.ndarray]:
    """bytes -> uint8 (H, W, 3) by the named library. imagecodecs measured fastest for 224 px crops."""
    if name == "imagecodecs":
        return decode_jpeg
    if name == "torchvision":
        import torch
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as torchvision_decode

        def decode(data: bytes) -> np.ndarray:
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return torchvision_decode(encoded, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()

        return decode
    if name == "pil":
        return lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    raise InputError(None, "decoder", "one of 'imagecodecs', 'torchvision', 'pil'", name)


_NPY_MAGIC = b"\x93NUMPY"
_NPY_DESCR = re.compile(r"'descr':\s*'([^']+)'")
_NPY_FORTRAN = re.compile(r"'fortran_order':\s*(True|False)")
_NPY_SHAPE = re.compile(r"'shape':\s*\(([^)]*)\)")
_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) from an .npy header dict, or None for layouts left to ``np.load``."""
    text = header.decode("latin1")
    descr, fortran, shape = _NPY_DESCR.search(text), _NPY_FORTRAN.search(text), _NPY_SHAPE.search(text)
    if descr is None or fortran is None or shape is None or fortran.group(1) == "True":
        return None
    dtype = np.dtype(descr.group(1))
    if dtype.hasobject:
        return None
    return dtype, tuple(int(d) for d in shape.group(1).replace(" ", "").split(",") if d)


def load_npy(data: bytes) -> np.ndarray:
    """Array from ``.npy`` bytes as a read-only view (no copy); ``np.load`` for rare layouts.

    ``np.load`` parses the header with ``ast.literal_eval`` (~0.15 ms per array, measured), more
    than a sample's JPEG decode budget allows; headers repeat across samples (same dtype, a handful
    of shapes), so their parse is cached here.
    """
    if data[:6] != _NPY_MAGIC:
        raise ValueError("not an .npy file (bad magic)")
    if data[6] == 1:
        header_len, start = int.from_bytes(data[8:10], "little"), 10
    else:
        header_len, start = int.from_bytes(data[8:12], "little"), 12
    header = data[start : start + header_len]
    layout = _LAYOUTS.get(header)
    if layout is None:
        layout = _npy_layout(header)
        if layout is None:
            return np.load(io.BytesIO(data), allow_pickle=False)
        if len(_LAYOUTS) < 4096:
            _LAYOUTS[header] = layout
    dtype, shape = layout
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start + header_len).reshape(shape)


def decode_cell_arrays(raw: dict) -> CellArrays:
    """The cell-tower members of a raw tar sample (tokens, neighbours, offsets, json), checked.

    Shared by training (:func:`decode_sample`) and by cell embedding, which never decodes the crop.
    Errors name the shard and member.
    """
    key = raw.get("__key__")
    url = raw.get("__url__")
    field = "tokens.npy"
    try:
        tokens = load_npy(raw["tokens.npy"])  # int32 (L,)
        field = "nbr_tokens.npy"
        nbr_tokens = load_npy(raw["nbr_tokens.npy"])  # int32 (m, L)
        field = "nbr_offsets.npy"
        nbr_offsets = load_npy(raw["nbr_offsets.npy"])  # float32 (m, 2) µm
        field = "json"
        meta = json.loads(raw["json"])
    except KeyError as exc:
        raise InputError(url, f"{key}.{field}", f"a sample with {_MEMBERS}", "missing") from exc
    except Exception as exc:
        raise InputError(url, f"{key}.{field}", "a decodable member", f"{type(exc).__name__}: {exc}") from exc
    if nbr_tokens.size == 0 and nbr_offsets.size == 0:  # no neighbours, whatever the empty shape
        nbr_tokens = np.zeros((0, tokens.shape[0]), dtype=np.int32)
        nbr_offsets = np.zeros((0, 2), dtype=np.float32)
    if tokens.ndim != 1 or nbr_tokens.ndim != 2 or nbr_tokens.shape[1] != tokens.shape[0]:
        raise InputError(url, f"{key}.nbr_tokens.npy", f"(m, {tokens.shape[0]}) beside tokens (L,)", nbr_tokens.shape)
    if nbr_offsets.shape != (nbr_tokens.shape[0], 2):
        raise InputError(url, f"{key}.nbr_offsets.npy", f"({nbr_tokens.shape[0]}, 2) µm", nbr_offsets.shape)
    return CellArrays(tokens, nbr_tokens, nbr_offsets, meta)


def decode_image(raw: dict, decode: Callable[[bytes], np.ndarray] = decode_jpeg) -> np.ndarray:
    """The sample's H&E crop as uint8 (H, W, 3), checked. Errors name the shard and member."""
    key = raw.get("__key__")
    url = raw.get("__url__")
    try:
        image = decode(raw["jpg"])  # uint8 (H, W, 3)
    except KeyError as exc:
        raise InputError(url, f"{key}.jpg", f"a sample with {_MEMBERS}", "missing") from exc
    except Exception as exc:
        raise InputError(url, f"{key}.jpg", "a decodable member", f"{type(exc).__name__}: {exc}") from exc
    if image.ndim == 2:  # greyscale JPEG
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(url, f"{key}.jpg", "an RGB image", f"shape {image.shape}")
    return image


def decode_sample(raw: dict, decode: Callable[[bytes], np.ndarray] = decode_jpeg) -> DecodedSample:
    """Raw tar sample (bytes per member) -> checked arrays. Errors name the shard and member."""
    image = decode_image(raw, decode)
    cell = decode_cell_arrays(raw)
    return DecodedSample(raw.get("__key__"), image, cell.tokens, cell.nbr_tokens, cell.nbr_offsets_um, cell.meta)


def check_members(raw: dict, where: object = None) -> None:
    """Raise InputError unless the sample has exactly the members of :data:`SAMPLE_KEYS`."""
    present = {k for k in raw if not k.startswith("__")}
    if present != set(SAMPLE_KEYS):
        raise InputError(
            where if where is not None else raw.get("__url__"),
            f"sample {raw.get('__key__')}",
            f"members {sorted(SAMPLE_KEYS)}",
            sorted(present),
        )

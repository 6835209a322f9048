"""The shard manifest: what a training run needs to know about a shard folder.

Each slide writes ``<slide>/slide_manifest.json`` when (and only when) all of its shards are in
place; ``manifest.json`` at the top is built from those, so a crashed or still-running slide is
never listed. The merge step works the same on one machine and after a SLURM array job.
"""

from __future__ import annotations

import datetime as _dt
import logging
import tarfile
from pathlib import Path

from common.atomic import write_json
from common.errors import InputError, read_json_file

from .reader import is_remote, shard_url
from .sample import SAMPLE_KEYS, decode_sample

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
WIDS_INDEX_NAME = "wids_index.json"  # the same shards as webdataset's indexed-dataset (wids) descriptor
SLIDE_MANIFEST_NAME = "slide_manifest.json"
FORMAT_VERSION = 1


def slide_manifests(shard_dir: str | Path) -> list[dict]:
    """Completed slides under ``shard_dir`` (each in its own folder), sorted by slide id."""
    found = []
    for path in sorted(Path(shard_dir).glob(f"*/{SLIDE_MANIFEST_NAME}")):
        found.append(read_json_file(path, "a slide manifest"))
    return found


def write_wids_index(shard_dir: Path, shards: list[dict]) -> Path:
    """``wids_index.json``: the shards as a ``wids-shard-index-v1`` descriptor (url relative to this file,
    nsamples, filesize), so ``wids.ShardListDataset`` can index samples at random without a scan."""
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": shard_dir.name,
        "shardlist": [
            {"url": s["path"], "nsamples": int(s["n_samples"]), "filesize": (shard_dir / s["path"]).stat().st_size}
            for s in shards
        ],
    }
    return write_json(shard_dir / WIDS_INDEX_NAME, index)


def merge_manifests(shard_dir: str | Path, vocabulary: dict, config: dict, tech_mean: dict | None = None) -> dict:
    """Write ``manifest.json`` listing every completed slide's shards; return it."""
    shard_dir = Path(shard_dir)
    slides = slide_manifests(shard_dir)
    if not slides:
        raise InputError(shard_dir, SLIDE_MANIFEST_NAME, "at least one completed slide", "none")
    for slide in slides:
        if slide["vocabulary_sha256"] != vocabulary["sha256"]:
            raise InputError(
                shard_dir / slide["slide"] / SLIDE_MANIFEST_NAME,
                "vocabulary_sha256",
                f"the shared vocabulary {vocabulary['sha256'][:12]}",
                slide["vocabulary_sha256"][:12],
            )
    shards = [
        {"path": f"{slide['slide']}/{shard['path']}", "n_samples": shard["n_samples"], "slide": slide["slide"]}
        for slide in slides
        for shard in slide["shards"]
    ]
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "n_samples": sum(s["n_samples"] for s in shards),
        "n_shards": len(shards),
        "shards": shards,
        "sample_keys": list(SAMPLE_KEYS),
        "vocabulary": vocabulary,
        "tech_mean": tech_mean,
        "slides": {s["slide"]: {k: v for k, v in s.items() if k != "shards"} for s in slides},
        "config": config,
    }
    write_wids_index(shard_dir, shards)
    write_json(shard_dir / MANIFEST_NAME, manifest)
    log.info("manifest: %d samples in %d shards from %d slides", manifest["n_samples"], len(shards), len(slides))
    return manifest


def load_manifest(
    path: str | Path, require_shards: bool = True, expected: str = "a shard manifest written by make_shards"
) -> dict:
    """Read a manifest (the file, or the folder holding it); ``root`` is added (the folder holding it).

    ``require_shards=False`` is for readers that need only what the manifest records (an export
    needs the vocabulary and the tokenizer settings, not the shards, which may be on another cluster).
    ``expected`` says, in the error of a missing file, what the caller wanted.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    manifest = read_json_file(path, expected)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(path, "format_version", str(FORMAT_VERSION), manifest.get("format_version"))
    vocab = manifest.get("vocabulary") or {}
    missing_vocab = [key for key in ("path", "sha256", "size") if key not in vocab]
    if missing_vocab:
        raise InputError(
            path, "vocabulary", "path, sha256 and size of the shards' vocabulary", f"missing {missing_vocab}"
        )
    if require_shards:  # local shards must be there; remote ones (URLs) are checked when they are read
        local = [s["path"] for s in manifest["shards"] if not is_remote(shard_url(path.parent, s["path"]))]
        missing = [p for p in local if not (path.parent / p).is_file()]
        if missing:
            raise InputError(path, "shards", "every listed shard on disk", f"{len(missing)} missing, e.g. {missing[0]}")
    manifest["root"] = str(path.parent)
    return manifest


def verify_shards(path: str | Path) -> dict:
    """Read every listed shard back with ``tarfile`` and with ``webdataset``; check the counts.

    Each sample must have exactly the manifest's keys, decodable JPEG and arrays of the documented
    shapes (``data_shards.sample``). The tar is read by ``tarfile`` and ``webdataset``, not by the
    project's own reader, so a shard other tools cannot read is caught here. Returns {"n_shards",
    "n_samples"}; raises InputError naming the first bad shard.
    """
    import webdataset as wds  # pulls in torch (~3 s): only verify needs it, not every data entry point

    manifest = load_manifest(path)
    root = Path(manifest["root"])
    keys = set(manifest["sample_keys"])
    total = 0
    for shard in manifest["shards"]:
        shard_path = root / shard["path"]
        try:
            with tarfile.open(shard_path) as tar:
                names = tar.getnames()
        except (tarfile.TarError, OSError) as exc:
            raise InputError(shard_path, None, "a complete tar archive", f"{type(exc).__name__}: {exc}") from exc
        if len(names) != len(keys) * shard["n_samples"]:
            raise InputError(shard_path, "members", f"{len(keys)} per sample × {shard['n_samples']}", len(names))
        seen = 0
        for sample in wds.WebDataset(str(shard_path), shardshuffle=False, empty_check=False):
            present = {k for k in sample if not k.startswith("__")}
            if present != keys:
                raise InputError(shard_path, f"sample {sample['__key__']}", f"keys {sorted(keys)}", sorted(present))
            decode_sample(dict(sample, __url__=str(shard_path)))
            seen += 1
        if seen != shard["n_samples"]:
            raise InputError(shard_path, "samples", str(shard["n_samples"]), seen)
        total += seen
    return {"n_shards": len(manifest["shards"]), "n_samples": total}

"""Which bundle a registration belongs to: recorded in ``registration.json``, checked when sharding.

A registration is a map between one bundle's cells and one H&E slide. A data config that points a
slide at another slide's ``registration.json`` maps the cells with the wrong map, and nothing
downstream can tell (the crops are H&E all the same). So ``register_bundle`` records the bundle's
identity (folder, XOA run and region names, sha256 of the cells table, of the keypoints and of the
alignment file) and :func:`check_bundle_identity` compares it with the bundle being sharded.

Rule: the cells table's sha256 decides. A changed cells table with the same run and region names
is the same slide re-analysed (e.g. re-segmented: cell centroids change, the coordinate frame does
not), accepted with a warning. A registration saved before identities were recorded is accepted
with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from common.errors import InputError

from ..xenium import EXPERIMENT_FILE, find_cells_table

log = logging.getLogger(__name__)

EXPERIMENT_KEYS = ("run_name", "region_name", "slide_id")  # experiment.xenium fields naming the run


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _experiment_names(bundle_dir: Path) -> dict:
    path = bundle_dir / EXPERIMENT_FILE
    if not path.is_file():
        return {}
    try:
        experiment = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # read_xenium reports a broken experiment.xenium; identity just lacks the names
    if not isinstance(experiment, dict):
        return {}
    return {key: experiment[key] for key in EXPERIMENT_KEYS if isinstance(experiment.get(key), str)}


def bundle_identity(bundle_dir: str | Path, inputs: dict[str, Path | None]) -> dict:
    """JSON-ready identity: bundle folder, experiment names, the cells table and input files with sha256."""
    bundle_dir = Path(bundle_dir)
    identity: dict = {"bundle_dir": str(bundle_dir.resolve()), **_experiment_names(bundle_dir)}
    cells = find_cells_table(bundle_dir)
    if cells is not None:
        identity["cells"] = {"file": cells.name, "sha256": sha256_file(cells)}
    identity["inputs"] = {
        name: {"file": str(path), "sha256": sha256_file(path)}
        for name, path in inputs.items()
        if path is not None and path.is_file()
    }
    return identity


def _describe(identity: dict) -> str:
    cells = identity.get("cells") or {}
    names = "/".join(str(identity[k]) for k in ("run_name", "region_name") if identity.get(k))
    text = f"bundle {identity.get('bundle_dir')}"
    if names:
        text += f" (run/region {names})"
    if cells:
        text += f", {cells.get('file')} sha256 {str(cells.get('sha256'))[:12]}…"
    return text


def check_bundle_identity(saved: dict | None, bundle_dir: str | Path, source: str | Path | None) -> None:
    """Refuse a registration saved for another bundle (one InputError naming both); warn when unsure."""
    bundle_dir = Path(bundle_dir)
    if not saved:
        log.warning(
            "%s records no bundle identity (saved before identities were recorded): cannot check that it "
            "belongs to %s; re-run `make_shards.py register` to record one",
            source,
            bundle_dir,
        )
        return
    current = bundle_identity(bundle_dir, {})
    saved_cells = saved.get("cells") or {}
    cells = bundle_dir / str(saved_cells.get("file", ""))
    if saved_cells.get("file") and cells.is_file():
        current["cells"] = {"file": cells.name, "sha256": sha256_file(cells)}  # the file it was recorded from
    if saved_cells.get("sha256") and saved_cells.get("sha256") == (current.get("cells") or {}).get("sha256"):
        return
    same_run = all(saved.get(k) and saved.get(k) == current.get(k) for k in ("run_name", "region_name"))
    if same_run:
        log.warning(
            "%s: the cells table of %s changed since it was registered (same run %s, region %s: "
            "re-segmented?); the registration is used",
            source,
            bundle_dir,
            saved.get("run_name"),
            saved.get("region_name"),
        )
        return
    raise InputError(
        source,
        "bundle",
        f"a registration of the slide's bundle: {_describe(current)}",
        f"one saved for {_describe(saved)}: a registration.json from another bundle? Point "
        "slides[].registration at this bundle's registration, or register it (make_shards.py register)",
    )

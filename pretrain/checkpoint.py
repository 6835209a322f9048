"""DeepSpeed checkpoints that a crash can never leave unloadable.

Layout under the run's checkpoint folder (a filesystem every rank can reach)::

    checkpoints/
      latest                 the tag of the newest COMPLETE checkpoint, e.g. "step_000120"
      step_000100/           one folder per tag, written by DeepSpeed (model, optimizer shards)
        mp_rank_00_model_states.pt, *_optim_states.pt, ...
        config.yaml          the run's resolved config (for export)
        client_state.json    step, epoch, position in the epoch (human-readable copy)
      step_000120/

DeepSpeed writes ``latest`` itself as soon as rank 0 has saved its own files, possibly while other
ranks are still writing theirs, and not atomically. Here every rank saves with
``save_latest=False``; after a barrier (every rank's files are on disk) rank 0 replaces
``latest`` in one rename, and only then may old tags be pruned. A crash at any moment therefore
leaves ``latest`` naming a complete checkpoint, or absent before the first one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from common.atomic import atomic_path, write_json
from common.errors import InputError

log = logging.getLogger(__name__)

LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
CLIENT_STATE_NAME = "client_state.json"


def tag_for_step(step: int) -> str:
    """Checkpoint tag of optimizer step ``step``: ``step_000123`` (sorts by step)."""
    return f"step_{int(step):06d}"


def step_of_tag(tag: str) -> int | None:
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def read_latest(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` names, or None when no checkpoint was completed yet."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    if not tag:
        raise InputError(path, None, "a checkpoint tag", "an empty file")
    return tag


def write_latest(ckpt_dir: str | Path, tag: str) -> Path:
    """Point ``latest`` at ``tag`` in one rename (readers see the old or the new tag, never a mix)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / tag).is_dir():
        raise InputError(ckpt_dir / tag, None, "a saved checkpoint folder before pointing latest at it", "missing")
    with atomic_path(ckpt_dir / LATEST) as tmp:
        tmp.write_text(tag, encoding="utf-8")
    return ckpt_dir / LATEST


def resolve_resume(ckpt_dir: str | Path, resume: str | None) -> str | None:
    """The tag to resume from: ``None``/"" (start fresh), ``"latest"`` (fresh if there is none yet)
    or an explicit tag, which must exist."""
    if resume in (None, "", "none", "null"):
        return None
    ckpt_dir = Path(ckpt_dir)
    tag = read_latest(ckpt_dir) if resume == LATEST else str(resume)
    if tag is None:
        log.info("resume=latest but %s holds no completed checkpoint yet: starting from scratch", ckpt_dir)
        return None
    if not (ckpt_dir / tag).is_dir():
        raise InputError(ckpt_dir / tag, "resume", "an existing checkpoint tag folder", "missing")
    return tag


def save_checkpoint(
    engine: Any,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict,
    *,
    write_extras: Callable[[Path], None] | None = None,
    keep_last: int | None = None,
) -> str:
    """Save a checkpoint on every rank (all ranks must call this), then publish it as ``latest``.

    ``write_extras(tag_dir)`` runs on rank 0 after DeepSpeed's files are written (e.g. the config).
    ``keep_last``: keep only the newest N step folders (the published one always survives).
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for_step(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if _is_rank0():
        tag_dir = ckpt_dir / tag
        write_json(tag_dir / CLIENT_STATE_NAME, client_state)
        if write_extras is not None:
            write_extras(tag_dir)
    _barrier()  # every rank's shards are on disk before latest may name them
    if _is_rank0():
        write_latest(ckpt_dir, tag)
        if keep_last:
            prune_checkpoints(ckpt_dir, keep_last)
        log.info("checkpoint %s saved in %s", tag, ckpt_dir)
    _barrier()
    return tag


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` step folders; never the one ``latest`` names."""
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest(ckpt_dir)
    tags = sorted(
        (p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of_tag(p.name) is not None), key=step_of_tag
    )
    doomed = [t for t in tags[: max(0, len(tags) - keep_last)] if t != latest]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return doomed


def load_checkpoint(engine: Any, ckpt_dir: str | Path, tag: str, *, load_optimizer_states: bool = True) -> dict:
    """Load ``tag`` into the engine (all ranks); return the client state saved with it."""
    ckpt_dir = Path(ckpt_dir)
    load_path, client_state = engine.load_checkpoint(
        str(ckpt_dir),
        tag=tag,
        load_optimizer_states=load_optimizer_states,
        load_lr_scheduler_states=load_optimizer_states,
    )
    if load_path is None:
        raise InputError(ckpt_dir / tag, None, "a loadable DeepSpeed checkpoint", "DeepSpeed could not load it")
    if not client_state or "step" not in client_state:
        json_path = ckpt_dir / tag / CLIENT_STATE_NAME
        if not json_path.is_file():
            raise InputError(
                ckpt_dir / tag, "client_state", "the training position saved with the checkpoint", "missing"
            )
        client_state = json.loads(json_path.read_text())
    return client_state

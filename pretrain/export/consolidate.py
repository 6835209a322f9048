"""Finding a DeepSpeed checkpoint and consolidating its weights into one fp32 state_dict.

Weights are DeepSpeed's fp32 master weights, gathered from every rank's shards with DeepSpeed's
own ``zero_to_fp32`` utilities (ZeRO 1-3); a checkpoint saved without ZeRO holds the whole module
state in rank 0's model-states file. A run trained in bf16 computed its embeddings with bf16
copies of them, so exported fp32 embeddings agree with the training model's to bf16 precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from common.errors import InputError

from .. import checkpoint as ckpt
from ..training_module import MODEL_PREFIX

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
    ckpt_dir: Path  # the folder of tag folders (and ``latest``)
    tag: str

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def run_dir(self) -> Path:
        """The training run's out_dir (pretrain.trainer writes ``<out_dir>/checkpoints/<tag>``)."""
        return self.ckpt_dir.parent


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*model_states.pt"))


def find_checkpoint(path: str | Path, tag: str | None = None) -> CheckpointLocation:
    """A run folder, its ``checkpoints/`` folder (``latest`` or ``tag`` picks) or one tag folder."""
    path = Path(path)
    what = "a DeepSpeed checkpoint: the run folder, its checkpoints/ folder or one tag folder"
    if not path.is_dir():
        raise InputError(path, None, what, "no such folder")
    if _is_tag_dir(path):
        if tag is not None and tag != path.name:
            raise InputError(path, "tag", f"no --tag, or the folder's own tag '{path.name}'", tag)
        return CheckpointLocation(path.parent, path.name)
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if tag is None:
        tag = ckpt.read_latest(ckpt_dir)
        if tag is None:
            raise InputError(
                ckpt_dir / ckpt.LATEST,
                None,
                f"a '{ckpt.LATEST}' file naming the checkpoint tag (or pass --tag)",
                "no such file",
            )
    location = CheckpointLocation(ckpt_dir, tag)
    if not _is_tag_dir(location.tag_dir):
        raise InputError(
            location.tag_dir,
            None,
            "a DeepSpeed tag folder holding *model_states.pt files",
            "missing" if not location.tag_dir.exists() else "no model states in it",
        )
    return location


def consolidate_state_dict(location: CheckpointLocation) -> dict[str, torch.Tensor]:
    """The full fp32 state_dict of the DeepSpeed module, gathered from every rank's shards."""
    tag_dir = location.tag_dir
    if not glob.glob(str(tag_dir / "*optim_states.pt")):
        return _module_state_without_zero(tag_dir)
    # Imported here: DeepSpeed takes seconds to import, and loading an export never needs it.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # zero_to_fp32 prints its progress; keep it for the debug log
    try:
        with contextlib.redirect_stdout(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(str(location.ckpt_dir), tag=location.tag)
    except ValueError as exc:
        if "is not a zero checkpoint" in str(exc):
            return _module_state_without_zero(tag_dir)
        raise InputError(tag_dir, None, "a complete DeepSpeed ZeRO checkpoint", str(exc)) from exc
    except FileNotFoundError as exc:
        raise InputError(tag_dir, None, "a complete DeepSpeed ZeRO checkpoint", str(exc)) from exc
    finally:
        log.debug("zero_to_fp32: %s", chatter.getvalue().strip())
    log.info("consolidated %d tensors from %s with DeepSpeed's zero_to_fp32", len(state), tag_dir)
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def _module_state_without_zero(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Without ZeRO, rank 0's model states file holds the whole module state."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise InputError(tag_dir, None, "mp_rank_00_model_states.pt (a checkpoint saved without ZeRO)", "missing")
    saved = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed pickles more than tensors
    module = saved.get("module") if isinstance(saved, Mapping) else None
    if not isinstance(module, Mapping) or not module:
        raise InputError(path, "module", "the module's state_dict", "missing or empty")
    log.info("read %d tensors from %s (checkpoint saved without ZeRO)", len(module), path)
    return {key: value.float() if value.is_floating_point() else value for key, value in module.items()}


def split_training_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PASTTrainingModule state → (PASTModel state, the rest, e.g. ``temperature.raw``).

    A bare PASTModel's state (no ``model.`` prefix) passes through unchanged.
    """
    if not any(key.startswith(MODEL_PREFIX) for key in state):
        return dict(state), {}
    model_state = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    extras = {k: v for k, v in state.items() if not k.startswith(MODEL_PREFIX)}
    return model_state, extras

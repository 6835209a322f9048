"""The DeepSpeed training loop: LR schedule, crash-safe checkpoints, and real multi-process runs.

The slow tests start `deepspeed` exactly as a user would, on CPU ranks with gloo, training the
shipped `configs/pretrain/tiny_cpu.yaml` (made smaller by overrides) on synthetic shards whose
crop colour is tied to the cell's leading gene token:

* kill-and-resume on 2 ranks (`--num_gpus 2`): SIGKILL the launcher's process group once the
  first checkpoint is published mid-epoch; `latest` must load, and the resumed run must continue
  at the saved step + 1 with the same learning rate, data epoch and samples an uninterrupted run
  had, and end with the same weights AND optimizer state (moments, step counts) as a run that was
  never interrupted, bit for bit. The resumed run finishes, so it is also the plain "2 ranks train
  a few steps and write TensorBoard events and checkpoints" run;
* a corrupt JPEG mid-run on 2 ranks: skipped, named and counted (log, TensorBoard, final
  metrics), and the run finishes;
* two "nodes" of one rank each, started by two launchers (`--no_ssh --node_rank`, master on
  127.0.0.1): the ranks read disjoint samples covering the epoch and end with identical weights.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from common.atomic import write_json
from common.config import apply_schema
from common.errors import InputError
from data_shards.manifest import SLIDE_MANIFEST_NAME, merge_manifests
from data_shards.reader import tar_samples
from data_shards.sample import encode_sample
from data_shards.writer import ShuffledShardWriter, plan_shards
from pretrain import checkpoint as ckpt
from pretrain.config import PretrainConfig
from pretrain.data import plan_rank
from pretrain.deepspeed_config import build_deepspeed_config
from pretrain.loss import LearnableTemperature
from pretrain.schedule import WarmupCosineSchedule, target_mix_at, warmup_cosine_lr
from pretrain.training_module import PASTTrainingModule, parameter_groups

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
CONTEXT = 24  # tokens per cell in the synthetic shards
N_GENES = 40
N_TYPES = 8  # planted cell types: colour of the crop <-> leading gene token
RUN_TIMEOUT_S = 600  # the very first DeepSpeed start on a machine JIT-builds its CPU comm op (minutes)

# Smaller than the demo: a step takes a fraction of a second on a shared 2-core machine.
TINY = [
    "model.image.kwargs.depth=1",
    "model.image.kwargs.embed_dim=32",
    "model.image.kwargs.num_heads=2",
    "model.cell.dim=32",
    "model.cell.ff_dim=64",
    "model.cell.layers=1",
    "model.graph.hidden=32",
    "model.proj_dim=32",
    "train.micro_batch_size=8",
    "data.shuffle_buffer=16",
    "log.every_steps=1",
    "checkpoint.keep_last=null",
    "debug.log_samples=true",
]


# ---------------------------------------------------------------------------------------------
# Synthetic shards


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_planted_shards(root: Path, n_samples: int, samples_per_shard: int, seed: int = 0) -> dict[str, str]:
    """Shards + manifest under ``root``; returns {sample key: shard path relative to root}."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(N_TYPES, 3))
    slide_dir = root / "s0"
    xy_um = rng.uniform(0, 2000, size=(n_samples, 2))
    plan = plan_shards(xy_um, samples_per_shard, seed)
    writer = ShuffledShardWriter(slide_dir, "s0", plan, seed)
    for i in range(n_samples):
        cell_type = i % N_TYPES
        image = np.clip(palette[cell_type] + rng.normal(0, 12, size=(224, 224, 3)), 0, 255).astype(np.uint8)
        genes = rng.permutation(np.arange(N_TYPES, N_GENES))[: CONTEXT - 8]
        tokens = np.full(CONTEXT, 1, dtype=np.int32)  # pad
        tokens[:4] = [9, 4, 5, 30 + cell_type]  # xenium, spatial, human, the planted gene
        tokens[4 : 4 + len(genes)] = 30 + genes
        n_nbr = int(rng.integers(0, 4))
        nbr_tokens = np.tile(tokens, (n_nbr, 1))
        offsets = rng.uniform(-30, 30, size=(n_nbr, 2)).astype(np.float32)
        meta = {"slide": "s0", "cell_id": str(i), "x_um": float(xy_um[i, 0]), "y_um": float(xy_um[i, 1])}
        writer.add(i, encode_sample(f"s0_{i:05d}", _jpeg(image), tokens, nbr_tokens, offsets, meta))
    shards = writer.finish()
    vocabulary = {"path": "vocab.tsv", "sha256": "0" * 64, "size": N_GENES}
    write_json(
        slide_dir / SLIDE_MANIFEST_NAME,
        {
            "slide": "s0",
            "vocabulary_sha256": vocabulary["sha256"],
            "n_samples": n_samples,
            "shards": shards,
        },
    )
    merge_manifests(root, vocabulary, {"tokens": {"context_length": CONTEXT}})
    key_to_shard = {}
    for shard in shards:
        for sample in wds.WebDataset(str(slide_dir / shard["path"]), shardshuffle=False, empty_check=False):
            key_to_shard[sample["__key__"]] = f"s0/{shard['path']}"
    assert len(key_to_shard) == n_samples
    return key_to_shard


# ---------------------------------------------------------------------------------------------
# Launching


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _start(launcher_args: list[str], overrides: list[str], log_path: Path) -> subprocess.Popen:
    """Start `deepspeed <launcher_args> launch/pretrain.py --config tiny_cpu.yaml <overrides>`."""
    cmd = [str(DEEPSPEED), *launcher_args, str(ROOT / "launch" / "pretrain.py"), "--config", str(CONFIG), *overrides]
    log_file = open(log_path, "ab")
    # Own session: the whole launcher process group (launcher, ranks, loader workers) can be killed at once.
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )


def _wait(proc: subprocess.Popen, log_path: Path, timeout: float = RUN_TIMEOUT_S) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"run timed out after {timeout} s; log tail:\n{log_path.read_text(errors='replace')[-4000:]}")
    if rc != 0:
        pytest.fail(f"run exited with {rc}; log tail:\n{log_path.read_text(errors='replace')[-4000:]}")


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by SIGKILL
            pass
    return records


# ---------------------------------------------------------------------------------------------
# Unit tests: learning-rate schedule


def test_schedule_starts_at_1e_6_peaks_after_warmup_then_follows_a_cosine():
    kw = dict(peak_lr=1e-3, warmup_steps=10, total_steps=110, start_lr=1e-6, final_lr=1e-5)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(1e-6)
    assert warmup_cosine_lr(5, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)  # linear warm-up
    assert warmup_cosine_lr(10, **kw) == pytest.approx(1e-3)
    assert warmup_cosine_lr(60, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)  # half-way down the cosine
    assert warmup_cosine_lr(35, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine_lr(110, **kw) == pytest.approx(1e-5)
    assert warmup_cosine_lr(500, **kw) == pytest.approx(1e-5)
    rates = [warmup_cosine_lr(s, **kw) for s in range(111)]
    assert all(a < b for a, b in zip(rates[:10], rates[1:11]))  # rises during warm-up
    assert all(a > b for a, b in zip(rates[10:110], rates[11:111]))  # then falls monotonically


def test_target_mix_ramps_linearly_from_start_to_end_then_holds():
    assert [target_mix_at(s, 0.0, 1.0, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert target_mix_at(0, 0.0, 1.0, 0) == 1.0  # no ramp: the end value from the first step
    assert target_mix_at(3, 1.0, 1.0, 10) == 1.0  # the defaults: the paper's objective throughout
    with pytest.raises(InputError, match="target_mix"):
        target_mix_at(0, -0.5, 1.0, 4)


def test_scheduler_sets_rate_from_step_and_resumes_from_its_state():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [param]}, {"params": [], "lr_scale": 0.5}])
    kw = dict(peak_lr=1e-3, warmup_steps=4, total_steps=20, start_lr=1e-6, final_lr=0.0)
    schedule = WarmupCosineSchedule(optimizer, **kw)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
    for _ in range(7):
        optimizer.step()  # (no gradients: changes nothing) before the schedule, as DeepSpeed does
        schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(warmup_cosine_lr(7, **kw))
    assert schedule.get_last_lr()[1] == pytest.approx(0.5 * warmup_cosine_lr(7, **kw))
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    resumed = WarmupCosineSchedule(other, **kw)
    resumed.load_state_dict(schedule.state_dict())
    assert other.param_groups[0]["lr"] == pytest.approx(warmup_cosine_lr(7, **kw))
    with pytest.raises(InputError, match="train.start_lr"):
        WarmupCosineSchedule(other, **{**kw, "start_lr": 2e-3})


# ---------------------------------------------------------------------------------------------
# Unit tests: crash-safe `latest`


class _FakeEngine:
    """Stands in for a DeepSpeed engine: writes a file per save, can crash half-way through."""

    def __init__(self, crash_on_tag: str | None = None):
        self.crash_on_tag = crash_on_tag
        self.calls = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls.append((tag, save_latest))
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(
            b"half" if tag == self.crash_on_tag else b"full"
        )
        if tag == self.crash_on_tag:
            raise KeyboardInterrupt("killed while writing")  # what a crash mid-save looks like from here


def test_latest_names_only_complete_checkpoints_even_when_a_save_crashes(tmp_path):
    engine = _FakeEngine(crash_on_tag=ckpt.tag_for_step(20))
    assert ckpt.resolve_resume(tmp_path, "latest") is None  # nothing yet: start fresh
    ckpt.save_checkpoint(engine, tmp_path, 10, {"step": 10, "epoch": 0, "micro_in_epoch": 10})
    assert engine.calls == [("step_000010", False)]  # DeepSpeed must not write latest itself
    assert ckpt.read_latest(tmp_path) == "step_000010"
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(engine, tmp_path, 20, {"step": 20, "epoch": 0, "micro_in_epoch": 20})
    assert (tmp_path / "step_000020").is_dir()  # the partial folder exists...
    assert ckpt.resolve_resume(tmp_path, "latest") == "step_000010"  # ...but latest still names the complete one
    assert json.loads((tmp_path / "step_000010" / ckpt.CLIENT_STATE_NAME).read_text())["step"] == 10
    assert not list(tmp_path.glob(".latest*"))  # no temporary left behind


def test_write_latest_is_a_single_rename_and_refuses_missing_tags(tmp_path, monkeypatch):
    (tmp_path / "step_000001").mkdir()
    (tmp_path / "step_000002").mkdir()
    ckpt.write_latest(tmp_path, "step_000001")

    def crash(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ckpt.write_latest(tmp_path, "step_000002")
    monkeypatch.undo()
    assert ckpt.read_latest(tmp_path) == "step_000001"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["latest"]
    with pytest.raises(InputError, match="step_000009"):
        ckpt.write_latest(tmp_path, "step_000009")
    with pytest.raises(InputError, match="resume"):
        ckpt.resolve_resume(tmp_path, "step_000009")


def test_pruning_keeps_the_newest_and_never_the_published_tag(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / ckpt.tag_for_step(step)).mkdir()
    ckpt.write_latest(tmp_path, "step_000002")  # e.g. a crash after writing 3 and 4 but before publishing
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert removed == ["step_000001", "step_000003"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_000002", "step_000004"]


# ---------------------------------------------------------------------------------------------
# Unit tests: optimizer groups and DeepSpeed config


def test_no_weight_decay_on_biases_norms_positions_and_temperature():
    module = PASTTrainingModule(
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)), LearnableTemperature()
    )
    module.model.register_parameter("position_embedding", torch.nn.Parameter(torch.zeros(5, 4)))
    decay, no_decay = parameter_groups(module, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert module.temperature.raw.shape == (1,)  # DeepSpeed cannot broadcast 0-dim parameters
    assert any(p is module.temperature.raw for p in no_decay["params"])
    assert len(no_decay["params"]) == 5  # bias, LN weight + bias, position embedding, τ raw


def test_deepspeed_config_takes_batch_clipping_and_precision_from_the_train_section(tmp_path):
    cfg = apply_schema(
        PretrainConfig,
        {
            "deepspeed": {"config": str(ROOT / "configs/deepspeed/zero2.json")},
            "train": {"micro_batch_size": 16, "grad_accumulation": 4, "grad_clip": 0.5},
        },
    )
    ds = build_deepspeed_config(cfg, world_size=8, bf16=True)
    assert ds["train_batch_size"] == 16 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    cfg.deepspeed.config = str(bad)
    with pytest.raises(InputError, match="train_micro_batch_size_per_gpu"):
        build_deepspeed_config(cfg, world_size=8, bf16=True)


# ---------------------------------------------------------------------------------------------
# Multi-process runs with the deepspeed launcher


@pytest.mark.slow
def test_two_ranks_train_and_resume_after_sigkill_at_the_same_step_lr_and_data(tmp_path):
    shards = tmp_path / "shards"
    make_planted_shards(shards, n_samples=240, samples_per_shard=30)  # 8 shards
    out = tmp_path / "run"
    steps_per_epoch, epochs, every = 240 // (8 * 2), 2, 4  # 15 optimizer steps per epoch
    overrides = TINY + [
        f"data.manifest={shards / 'manifest.json'}",
        f"out_dir={out}",
        f"train.epochs={epochs}",
        f"checkpoint.every_steps={every}",
    ]
    log_path = tmp_path / "launcher.log"
    launcher = ["--num_gpus", "2", "--master_port", str(_free_port())]

    first = _start(launcher, overrides + ["resume=latest"], log_path)
    deadline = time.monotonic() + RUN_TIMEOUT_S

    def trained_past_first_checkpoint() -> bool:
        logs = [out / "debug" / f"samples_rank{r}.jsonl" for r in (0, 1)]
        return ckpt.read_latest(out / "checkpoints") is not None and all(
            p.is_file() and any(r["step"] > every for r in _read_jsonl(p)) for p in logs
        )

    # Kill once the first checkpoint is published and both ranks are into the next step, so that
    # the killed run also shows what an uninterrupted run did after the checkpoint.
    while not trained_past_first_checkpoint():
        assert first.poll() is None, log_path.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the launcher, both ranks and their loader workers
    first.wait()

    tag = ckpt.read_latest(out / "checkpoints")
    saved = json.loads((out / "checkpoints" / tag / ckpt.CLIENT_STATE_NAME).read_text())
    assert saved["step"] % steps_per_epoch != 0 and saved["epoch"] == 0, "killed after a mid-epoch checkpoint"
    assert tag == ckpt.tag_for_step(saved["step"]) and saved["micro_in_epoch"] == saved["step"]
    states = torch.load(
        out / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    assert "temperature.raw" in states["module"] and states["step"] == saved["step"]  # `latest` loads
    before = {r: _read_jsonl(out / "debug" / f"samples_rank{r}.jsonl") for r in (0, 1)}

    second = _start(launcher, overrides + ["resume=latest"], log_path)
    _wait(second, log_path)

    total = epochs * steps_per_epoch
    train_cfg = OmegaConf.load(CONFIG).train
    kw = dict(
        peak_lr=train_cfg.lr,
        warmup_steps=steps_per_epoch,
        total_steps=total,
        start_lr=train_cfg.start_lr,
        final_lr=train_cfg.final_lr,
    )
    for rank in (0, 1):
        records = _read_jsonl(out / "debug" / f"samples_rank{rank}.jsonl")
        resumed = records[len(before[rank]) :]
        first_new = resumed[0]
        assert first_new["step"] == saved["step"] + 1
        assert first_new["epoch"] == saved["epoch"] and first_new["micro"] == saved["micro_in_epoch"]
        assert first_new["lr"] == pytest.approx(warmup_cosine_lr(saved["step"], **kw), rel=1e-9)
        # The interrupted run got past the checkpoint: the resumed run repeats exactly its batches and rates.
        old = {r["step"]: r for r in before[rank] if r["step"] > saved["step"]}
        assert old, "the killed run should have trained past its checkpoint"
        for record in resumed:
            if record["step"] in old:
                assert record["keys"] == old[record["step"]]["keys"]
                assert record["lr"] == pytest.approx(old[record["step"]]["lr"], rel=1e-12)
        assert [r["step"] for r in resumed] == list(range(saved["step"] + 1, total + 1))
        assert {r["epoch"] for r in resumed if r["step"] > steps_per_epoch} == {1}

    # The finished run: checkpoints, TensorBoard scalars and final metrics.
    assert ckpt.read_latest(out / "checkpoints") == ckpt.tag_for_step(total)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == total and final["chance"] == pytest.approx(1 / 16)
    assert 0.0 <= final["retrieval_top1_img_to_cell"] <= 1.0 and math.isfinite(final["loss"])
    weights_at = {
        step: torch.load(
            out / "checkpoints" / ckpt.tag_for_step(step) / "mp_rank_00_model_states.pt",
            map_location="cpu",
            weights_only=False,
        )["module"]
        for step in (saved["step"], total)
    }
    changed = [k for k in weights_at[total] if not torch.equal(weights_at[total][k], weights_at[saved["step"]][k])]
    assert len(changed) > len(weights_at[total]) // 2  # training moved most tensors

    # The same run never interrupted: the same weights and optimizer state at the end, bit for bit.
    # (Fails when the resume does not restore the optimizer: load_optimizer_states=False.)
    straight = tmp_path / "straight"
    overrides_straight = [o if not o.startswith("out_dir=") else f"out_dir={straight}" for o in overrides]
    _wait(_start(launcher, overrides_straight, tmp_path / "straight.log"), tmp_path / "straight.log")
    differences = _checkpoint_differences(
        out / "checkpoints" / ckpt.tag_for_step(total), straight / "checkpoints" / ckpt.tag_for_step(total)
    )
    n_weights = sum(t.numel() for t in weights_at[total].values())
    # Compared: the weights, and Adam's two moments + fp32 master copy of every weight (ZeRO partitions).
    assert differences["numel"]["module"] >= n_weights
    assert min(differences["numel"][k] for k in ("exp_avg", "exp_avg_sq", "fp32_master")) >= n_weights
    assert not differences["differ"], f"resumed run differs from the uninterrupted one: {differences['differ'][:10]}"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    for name in (
        "train/loss",
        "train/temperature",
        "train/lr",
        "train/retrieval_top1_img_to_cell",
        "train/retrieval_top1_cell_to_img",
        "throughput/samples_per_s",
        "time/data_wait_s_mean",
        "throughput_per_rank/samples_per_s_rank000",
        "throughput_per_rank/samples_per_s_rank001",
    ):
        assert name in tags, name
    lr_steps = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lr_steps[total] == pytest.approx(warmup_cosine_lr(total - 1, **kw), rel=1e-5)
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))


def _tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint structure, by path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    found = {}
    for key, item in items:
        found.update(_tensors(item, f"{prefix}/{key}"))
    return found


def _checkpoint_differences(a: Path, b: Path) -> dict:
    """Compare every tensor of two DeepSpeed checkpoint folders (model states and every rank's optimizer
    states, fp32 master weights and Adam moments included); paths of those that differ."""
    names = sorted(p.name for p in a.glob("*.pt"))
    assert names == sorted(p.name for p in b.glob("*.pt")) and any("optim_states" in n for n in names), names
    compared, differ = 0, []
    numel = dict.fromkeys(("module", "exp_avg", "exp_avg_sq", "fp32_master"), 0)
    for name in names:
        left = _tensors(torch.load(a / name, map_location="cpu", weights_only=False))
        right = _tensors(torch.load(b / name, map_location="cpu", weights_only=False))
        assert left.keys() == right.keys(), name
        for path in left:
            compared += 1
            kind = path.rsplit("/", 1)[-1] if path.endswith(("/exp_avg", "/exp_avg_sq")) else None
            kind = kind or ("module" if path.startswith("/module/") else None)
            kind = kind or ("fp32_master" if "fp32" in path else None)
            if kind:
                numel[kind] += left[path].numel()
            if left[path].shape != right[path].shape or not torch.equal(left[path], right[path]):
                differ.append(f"{name}{path}")
    return {"compared": compared, "differ": differ, "numel": numel}


def _planted_key_read_first(shards: Path, rank: int, world_size: int, seed: int) -> tuple[str, str]:
    """(shard path, key) of the first sample ``rank`` reads in epoch 0 (split=samples, one worker)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    sizes = [s["n_samples"] for s in manifest["shards"]]
    plan = plan_rank(
        sizes, 8, rank=rank, world_size=world_size, num_workers=0, epoch=0, seed=seed, steps=1, resample=False
    )
    shard, first, _ = plan.worker_pieces[0][0]
    path = shards / manifest["shards"][shard]["path"]
    key = [s["__key__"] for s in tar_samples([{"url": str(path)}])][first]
    return str(path), key


@pytest.mark.slow
def test_two_ranks_skip_a_corrupt_jpeg_mid_run_count_it_and_finish(tmp_path):
    shards = tmp_path / "shards"
    make_planted_shards(shards, n_samples=240, samples_per_shard=30)  # 8 shards, 120 samples per rank
    shard_path, bad_key = _planted_key_read_first(shards, rank=1, world_size=2, seed=0)
    with tarfile.open(shard_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(shard_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if name == f"{bad_key}.jpg":
                data = data[:100] + b"\xff\x00" * 64  # a JPEG that stops decoding part-way
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "run"
    overrides = TINY + [
        f"data.manifest={shards / 'manifest.json'}",
        f"out_dir={out}",
        "train.epochs=1",
        "train.steps_per_epoch=14",  # 112 of rank 1's 119 readable samples: one pass, the bad one met once
        "checkpoint.every_steps=0",
        "data.bad_samples_allowed=1",  # one unreadable sample is tolerated whatever the fraction
        "data.max_bad_fraction=0.0001",
    ]
    log_path = tmp_path / "launcher.log"
    _wait(_start(["--num_gpus", "2", "--master_port", str(_free_port())], overrides, log_path), log_path)

    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == 14 and final["bad_samples"] == 1
    assert final["bad_fraction"] == pytest.approx(1 / (14 * 8 * 2 + 1))
    trained = {k for r in (0, 1) for rec in _read_jsonl(out / "debug" / f"samples_rank{r}.jsonl") for k in rec["keys"]}
    assert bad_key not in trained and len(trained) == 14 * 8 * 2
    text = log_path.read_text(errors="replace")
    assert f"key {bad_key}" in text and Path(shard_path).name in text  # the log line names shard and key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert events.Scalars("data/bad_samples")[-1].value == 1

    # Control: the same damage with a bound it passes stops every rank with one clear error.
    strict = [o for o in overrides if not o.startswith(("out_dir=", "data.bad_samples_allowed="))]
    strict += [f"out_dir={tmp_path / 'strict'}", "data.bad_samples_allowed=0"]
    proc = _start(["--num_gpus", "2", "--master_port", str(_free_port())], strict, tmp_path / "strict.log")
    assert proc.wait(timeout=RUN_TIMEOUT_S) != 0
    strict_log = (tmp_path / "strict.log").read_text(errors="replace")
    assert "data.max_bad_fraction" in strict_log and f"{bad_key}" in strict_log  # the one clear error
    assert "Connection closed by peer" not in strict_log


@pytest.mark.slow
def test_two_nodes_of_one_rank_read_disjoint_samples_and_end_with_identical_weights(tmp_path):
    shards = tmp_path / "shards"
    key_to_shard = make_planted_shards(shards, n_samples=96, samples_per_shard=24)  # 4 shards, 96 keys
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = _free_port()
    overrides = TINY + [
        f"data.manifest={shards / 'manifest.json'}",
        f"out_dir={out}",
        "train.epochs=2",
        "checkpoint.every_steps=0",
        "debug.dump_final_weights=true",
    ]
    procs = []
    for node in (0, 1):
        launcher = [
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--num_nodes",
            "2",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
        ]
        log_path = tmp_path / f"node{node}.log"
        procs.append((_start(launcher, overrides, log_path), log_path))
    for proc, log_path in procs:
        _wait(proc, log_path)

    records = {r: _read_jsonl(out / "debug" / f"samples_rank{r}.jsonl") for r in (0, 1)}
    for epoch in (0, 1):
        read = {r: {k for rec in records[r] if rec["epoch"] == epoch for k in rec["keys"]} for r in (0, 1)}
        assert read[0] and read[1]
        assert not read[0] & read[1], f"epoch {epoch}: both ranks read {read[0] & read[1]}"
        assert read[0] | read[1] == set(key_to_shard)  # 6 steps x 8 x 2 ranks = all 96 samples
    assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]] == list(range(1, 13))

    weights = [torch.load(out / "debug" / f"final_weights_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name

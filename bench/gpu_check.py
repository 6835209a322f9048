"""One-GPU check of the pretraining path: bf16 PAST training steps through DeepSpeed, then checkpoint →
export → plain timm load on the GPU; figures appended to bench/RESULTS.md.

    bash bench/gpu_check.sh            # on one H100/H200 (world size 1, NCCL, bf16): under 8 minutes
    bash bench/gpu_check.sh --smoke    # the same path on the CPU with configs/pretrain/tiny_cpu.yaml (gloo, fp32)

For each config (GPU: vitl_throughput.yaml and past_vitl_8xa100.yaml; smoke: tiny_cpu.yaml) it writes
synthetic shards shaped like that config's data (224 px JPEG crops, rank-token rows of the context
length with 40-100 % of it real, up to 8 neighbours), trains ``--steps`` optimizer steps with
:class:`pretrain.trainer.Trainer` exactly as ``launch/pretrain.py`` does (log every step), and reads
from its TensorBoard the median samples/s, TFLOP/s and MFU of the steps after ``--skip`` (compile and
allocator warm-up), and the peak device memory. After the last config the checkpoint is exported
(:func:`pretrain.export.export_checkpoint`) and the image encoder loaded with plain
``timm.create_model(...); load_state_dict(strict=True)`` on the device; its features must match the
trained backbone's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import io
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from common.atomic import write_json  # noqa: E402
from common.config import load_config  # noqa: E402
from data_shards.manifest import SLIDE_MANIFEST_NAME, merge_manifests  # noqa: E402
from data_shards.sample import encode_sample  # noqa: E402
from data_shards.tokenize import save_tech_mean  # noqa: E402
from data_shards.vocabulary import Vocabulary  # noqa: E402
from data_shards.writer import ShuffledShardWriter, plan_shards  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.export import export_checkpoint  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402

GPU_CONFIGS = ("vitl_throughput", "past_vitl_8xa100")
SMOKE_CONFIGS = ("tiny_cpu",)
N_GENES = 400
# bf16 dense peak per device (TFLOP/s), for MFU when the config does not set log.peak_tflops_per_device.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def make_shards(root: Path, n_samples: int, context: int, seed: int = 0) -> Path:
    """Synthetic shards + manifest, vocabulary and tech mean as make_shards writes them; the manifest path."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    vocab = Vocabulary.from_genes(ids, [f"GENE{i}" for i in range(N_GENES)], source="panel")
    vocab.save(root / "vocab.tsv")
    save_tech_mean(root / "tech_mean.npy", np.linspace(0.5, 4.0, N_GENES))
    xy_um = rng.uniform(0, 5000, size=(n_samples, 2))
    plan = plan_shards(xy_um, 256, seed)
    writer = ShuffledShardWriter(root / "s0", "s0", plan, seed)
    palette = rng.integers(30, 226, size=(16, 3))
    jpegs = []
    for colour in palette:  # 16 distinct crops, reused: encoding is not what this checks
        image = np.clip(colour + rng.normal(0, 20, size=(224, 224, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    for i in range(n_samples):
        length = int(rng.integers(int(0.4 * context), context + 1))
        tokens = np.full(context, 1, dtype=np.int32)
        tokens[:3] = [9, 4, 5]
        tokens[3:length] = 30 + rng.permutation(N_GENES)[: length - 3]
        n_nbr = int(rng.integers(4, 9))
        nbr_tokens = np.tile(tokens, (n_nbr, 1))
        offsets = rng.uniform(-40, 40, size=(n_nbr, 2)).astype(np.float32)
        meta = {"slide": "s0", "cell_id": str(i), "x_um": float(xy_um[i, 0]), "y_um": float(xy_um[i, 1])}
        writer.add(i, encode_sample(f"s0_{i:06d}", jpegs[i % 16], tokens, nbr_tokens, offsets, meta))
    shards = writer.finish()
    vocabulary = {"path": "vocab.tsv", "sha256": vocab.sha256(), "size": len(vocab), "source": "panel"}
    write_json(
        root / "s0" / SLIDE_MANIFEST_NAME,
        {"slide": "s0", "vocabulary_sha256": vocabulary["sha256"], "n_samples": n_samples, "shards": shards},
    )
    tokens_cfg = {"context_length": context, "assay": "xenium", "modality": "spatial", "organism": "human"}
    config = {
        "tokens": tokens_cfg,
        "crop": {"size_px": 224, "target_um_per_px": 0.5},
        "neighbours": {"k": 8, "radius_um": 50.0},
    }
    merge_manifests(root, vocabulary, config, {"path": "tech_mean.npy", "source": "synthetic"})
    return root / "manifest.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _median_after(values: list[tuple[int, float]], skip: int) -> float | None:
    kept = [v for step, v in values if step > skip]
    return statistics.median(kept) if kept else None


def run_config(name: str, args, work: Path, device: torch.device) -> dict:
    """Train ``args.steps`` steps of configs/pretrain/<name>.yaml on synthetic shards; its figures."""
    config_path = ROOT / "configs" / "pretrain" / f"{name}.yaml"
    base = load_config(config_path, [], schema=PretrainConfig)
    micro = args.micro_batch or int(base.train.micro_batch_size)
    context = base.model.get("cell", {}).get("context_length") or (64 if args.smoke else 300)  # paper: 300
    manifest = make_shards(work / f"shards_{name}", micro * (args.steps + 2), int(context))
    overrides = [
        f"data.manifest={manifest}",
        f"out_dir={work / name}",
        "resume=null",
        f"train.max_steps={args.steps}",
        "train.warmup_steps=1",
        f"train.micro_batch_size={micro}",
        "log.every_steps=1",
        "checkpoint.every_steps=0",
        "checkpoint.at_epoch_end=false",
        "checkpoint.keep_last=null",
        "loss.collapse_guard.enabled=false",  # a handful of steps: nothing to guard
        f"data.num_workers={args.workers}",
    ]
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
        if peak and base.log.peak_tflops_per_device is None:
            overrides.append(f"log.peak_tflops_per_device={peak}")
        overrides += ["train.precision=bf16", "deepspeed.dist_backend=nccl"]
        if args.compile:
            overrides.append("model.compile=true")
        torch.cuda.reset_peak_memory_stats()
    else:
        overrides += ["train.precision=fp32", "deepspeed.dist_backend=gloo", "train.cpu_threads=auto"]
    start = time.perf_counter()
    trainer = Trainer(load_config(config_path, overrides, schema=PretrainConfig))
    metrics = trainer.train()
    wall = time.perf_counter() - start
    scalars = _scalars(work / name / "tensorboard")
    result = {
        "config": name,
        "micro_batch": micro,
        "steps": args.steps,
        "samples_per_s": _median_after(scalars.get("throughput/samples_per_s", []), args.skip),
        "tflops_per_device": _median_after(scalars.get("throughput/tflops_per_device", []), args.skip),
        "mfu": _median_after(scalars.get("throughput/mfu", []), args.skip),
        "data_wait_fraction": _median_after(scalars.get("time/data_wait_fraction", []), args.skip),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "loss_first_last": [scalars["train/loss"][0][1], scalars["train/loss"][-1][1]],
        "wall_s": wall,
        "final_step": metrics["step"],
        "run_dir": str(work / name),
        "trainer": trainer,
    }
    return result


def export_and_load(result: dict, work: Path, device: torch.device) -> dict:
    """Checkpoint (saved at the run's end) → export → plain timm strict load on the device; max |Δ features|."""
    trainer = result["trainer"]
    export_dir = work / f"export_{result['config']}"
    start = time.perf_counter()
    export_checkpoint(Path(result["run_dir"]), export_dir)
    image_dir = export_dir / "image_encoder"
    config = json.loads((image_dir / "config.json").read_text())
    model = timm.create_model(config["architecture"], **config.get("model_args", {}), num_classes=0)
    model.load_state_dict(load_file(str(image_dir / "model.safetensors")), strict=True)
    model = model.to(device).eval()
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    backbone = trainer.engine.module.model.image_encoder.backbone
    dtype = next(backbone.parameters()).dtype
    with torch.no_grad():
        exported = model(images).float()
        trained = backbone(images.to(dtype)).float()
    # The export holds DeepSpeed's fp32 master weights; the training copy is bf16 on the GPU.
    difference = float((exported - trained).abs().max())
    scale = float(trained.abs().max())
    return {
        "export_s": time.perf_counter() - start,
        "max_abs_difference": difference,
        "relative_difference": difference / max(scale, 1e-12),
        "timm_device": str(next(model.parameters()).device),
    }


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def report(results: list[dict], export: dict, device: torch.device, args) -> str:
    if device.type == "cuda":
        machine = f"1 × {torch.cuda.get_device_name(0)}, bf16, DeepSpeed world size 1 (NCCL)"
    else:
        machine = f"CPU smoke ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), fp32, gloo"
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    lines = [
        "",
        f"### bench/gpu_check.sh{' --smoke' if args.smoke else ''} — {when} — {machine}",
        "",
        f"Synthetic shards; {args.steps} steps per config, medians of the steps after step {args.skip}.",
        "",
        "| config | micro batch | samples/s | TFLOP/s per device | MFU | data wait | peak memory | loss first → last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['micro_batch']} | {_fmt(r['samples_per_s'], '{:,.1f}')} | "
            f"{_fmt(r['tflops_per_device'], '{:.1f}')} | {_fmt(r['mfu'], '{:.1%}')} | "
            f"{_fmt(r['data_wait_fraction'], '{:.0%}')} | {_fmt(r['peak_memory_gib'], '{:.1f} GiB')} | "
            f"{r['loss_first_last'][0]:.3f} → {r['loss_first_last'][1]:.3f} |"
        )
    lines += [
        "",
        f"Export of {results[-1]['config']} → plain `timm.create_model` + strict `load_state_dict` on "
        f"{export['timm_device']}: max |Δ features| {export['max_abs_difference']:.3g} "
        f"({export['relative_difference']:.2%} of the largest feature; bf16 training copy vs fp32 export), "
        f"{export['export_s']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny_cpu.yaml, gloo: the same code path")
    parser.add_argument("--configs", nargs="*", help="config names under configs/pretrain (default by mode)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per config (GPU 30, smoke 3)")
    parser.add_argument("--skip", type=int, default=None, help="steps left out of the medians (GPU 10, smoke 1)")
    parser.add_argument("--micro-batch", type=int, default=None, help="train.micro_batch_size (default: the config's)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (GPU 12, smoke 0)")
    parser.add_argument("--compile", action="store_true", help="model.compile=true (GPU)")
    parser.add_argument("--work", default=None, help="scratch folder (default: runs/gpu_check[_smoke])")
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="appended to")
    args = parser.parse_args()
    smoke = args.smoke
    args.steps = args.steps or (3 if smoke else 30)
    args.skip = args.skip if args.skip is not None else (1 if smoke else 10)
    args.workers = args.workers if args.workers is not None else (0 if smoke else 12)
    configs = args.configs or (SMOKE_CONFIGS if smoke else GPU_CONFIGS)
    work = Path(args.work or ROOT / "runs" / ("gpu_check_smoke" if smoke else "gpu_check"))

    if smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (use --smoke on a CPU machine)", file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
    env = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))

    results = []
    for name in configs:
        results.append(run_config(name, args, work, device))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "trainer"}), flush=True)
        if name != configs[-1]:  # the process group stays (world size 1, same backend) for the next config
            del results[-1]["trainer"]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    export = export_and_load(results[-1], work, device)
    print(json.dumps(export), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    text = report(results, export, device, args)
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
    tolerance = 0.05 if device.type == "cuda" else 1e-4
    if export["relative_difference"] > tolerance:
        print(
            f"error: exported features differ from the trained backbone's by more than {tolerance:.0%}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

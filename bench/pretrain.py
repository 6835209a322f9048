"""Pretraining speed: the data pipeline per worker process, and one training step of the PAST model.

    python bench/pretrain.py [--part data|model|all] [--manifest runs/demo/shards/manifest.json]
        [--config configs/pretrain/tiny_cpu.yaml] [--device cpu|cuda] [--precision fp32|bf16] [--steps N]
        [--batch B] [--workers W] [--inputs synthetic|shards] [--deepspeed-log RUN_DIR] [--record]

ViT-L on one GPU (synthetic inputs of the right shapes: no shards needed on the GPU machine):

    python bench/pretrain.py --part model --device cuda --precision bf16 \\
        --config configs/pretrain/vitl_throughput.yaml --record

data:  samples/s of ``pretrain.data.make_loader`` over the shards, augmentation on and off (``--workers 0``
       times one process: the rate of one worker), and ms per sample of each stage, timed by calling the
       pipeline's own functions (tar read, JPEG decode, .npy/json, collate). The workers ship uint8
       crops and the drawn flips/jitter; ``pretrain.augment.DeviceImages`` applies them in the training
       process (timed here on the CPU per sample, for reference: on a GPU it is a few kernels per batch).
       Best of 3 for each figure (the machine is shared); the load average is printed with them.
model: one process; each step split into data wait (incl. the host → device copy), forward, loss, backward
       and optimizer step (clipping + AdamW + temperature clamp), synchronised on GPU. No gather in the
       loss and no gradient all-reduce (``--deepspeed-log`` reads a real multi-rank run for those).
       bf16 = autocast over fp32 master weights (DeepSpeed's bf16 also keeps fp32 masters). FLOPs from
       ``pretrain.models.estimate_flops_per_sample``: train = 3 × forward, recomputation not counted (MFU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402
from data_shards.manifest import load_manifest  # noqa: E402
from data_shards.reader import tar_samples  # noqa: E402
from data_shards.sample import decode_sample, jpeg_decoder  # noqa: E402
from data_shards.vocabulary import GENE_OFFSET  # noqa: E402
from pretrain.augment import AugmentConfig, DeviceImages  # noqa: E402
from pretrain.collate import BatchAssembler  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.data import make_loader  # noqa: E402
from pretrain.loss import LearnableTemperature, similarity_adjusted_loss  # noqa: E402
from pretrain.models import (  # noqa: E402
    DEFAULT_MODEL_CONFIG,
    build_model,
    estimate_flops_per_sample,
    real_token_mask,
    resolve_model_config,
)
from pretrain.training_module import PASTTrainingModule, parameter_groups, resolve_model_section  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 per GPU (SXM)
PHASES = ("data wait", "forward", "loss", "backward", "optimizer step")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown CPU")
    return f"{len(os.sched_getaffinity(0))} cores, {model}"


def best_of(fn, repeats: int = 3) -> float:
    """Least wall seconds of ``repeats`` calls: on a shared machine, the least disturbed one."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


# ---------------------------------------------------------------------------------------------- data


def loader_rate(manifest: str, batch: int, workers: int, augment: bool) -> float:
    """Samples/s over one epoch of the real loader (rank 0 of 1), worker start-up included; best of 3."""
    loader, steps = make_loader(manifest, batch, rank=0, world_size=1, num_workers=workers, augment=augment)
    return steps * batch / best_of(lambda: sum(1 for _ in loader), repeats=3)


def loader_vs_decode(manifest_path: str, batch: int) -> dict[str, float]:
    """One worker's loader (augmentation on) against the bare JPEG decode of the same shards, timed in
    alternation (3 rounds) so both see the same machine load; the round with the fastest loader."""
    manifest = load_manifest(manifest_path)
    urls = [{"url": str(Path(manifest["root"]) / s["path"])} for s in manifest["shards"]]
    jpegs = [r["jpg"] for r in tar_samples(urls)]
    decode = jpeg_decoder("imagecodecs")
    loader, steps = make_loader(manifest_path, batch, rank=0, world_size=1, num_workers=0, augment=True)
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        sum(1 for _ in loader)
        loader_ms = 1000 * (time.perf_counter() - start) / (steps * batch)
        start = time.perf_counter()
        for data in jpegs:
            decode(data)
        decode_ms = 1000 * (time.perf_counter() - start) / len(jpegs)
        rounds.append((loader_ms, decode_ms))
    loader_ms, decode_ms = min(rounds)
    return {"loader_ms": loader_ms, "decode_ms": decode_ms, "ratio": loader_ms / decode_ms, "rate": 1000 / loader_ms}


def stage_split(manifest_path: str, n: int, batch: int) -> dict[str, float]:
    """ms per sample of each stage on the first ``n`` samples of the shards, best of 3."""
    manifest = load_manifest(manifest_path)
    urls = [{"url": str(Path(manifest["root"]) / s["path"])} for s in manifest["shards"]]
    raws = list(itertools.islice(tar_samples(urls), n))
    n = len(raws)
    decode, torchvision_decode = jpeg_decoder("imagecodecs"), jpeg_decoder("torchvision")
    rng = np.random.default_rng(0)
    on, off = BatchAssembler(AugmentConfig(), rng, rng), BatchAssembler(None, rng, rng)
    n = n // batch * batch
    batches = [on(raws[i : i + batch]) for i in range(0, n, batch)]
    device_images = DeviceImages((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    seconds = {
        "tar read": lambda: list(itertools.islice(tar_samples(urls), n)),
        "JPEG decode (imagecodecs)": lambda: [decode(r["jpg"]) for r in raws[:n]],
        "decode_sample (JPEG + .npy + json)": lambda: [decode_sample(r, decode) for r in raws[:n]],
        "BatchAssembler, augment on (all but tar read)": lambda: [on(raws[i : i + batch]) for i in range(0, n, batch)],
        "BatchAssembler, augment off": lambda: [off(raws[i : i + batch]) for i in range(0, n, batch)],
        "(JPEG decode, torchvision)": lambda: [torchvision_decode(r["jpg"]) for r in raws[:n]],
        "(DeviceImages on this CPU, training process)": lambda: [
            device_images(b["image"], b["dihedral"], b["colour"]) for b in batches
        ],
    }
    ms = {name: 1000 * best_of(fn) / n for name, fn in seconds.items()}
    ms["collate = assembler - decode_sample"] = (
        ms["BatchAssembler, augment on (all but tar read)"] - ms["decode_sample (JPEG + .npy + json)"]
    )
    ms["total = tar read + assembler"] = ms["tar read"] + ms["BatchAssembler, augment on (all but tar read)"]
    ms["total / JPEG decode"] = ms["total = tar read + assembler"] / ms["JPEG decode (imagecodecs)"]
    return ms


def data_part(args) -> list[str]:
    batch, per = args.batch or 64, max(1, args.workers)
    rates = {augment: loader_rate(args.manifest, batch, args.workers, augment) for augment in (True, False)}
    split = stage_split(args.manifest, args.split_samples, batch)
    versus = loader_vs_decode(args.manifest, batch)
    load = "load average {:.2f} {:.2f} {:.2f} on {} cores".format(*os.getloadavg(), os.cpu_count())
    print(f"\ndata pipeline ({args.manifest}, batch {batch}, num_workers {args.workers}; target >= 1,500/s per worker)")
    print(f"  {load} (other processes share this machine; every figure is the best of 3)")
    for augment, rate in rates.items():
        print(f"  augment {'on ' if augment else 'off'}: {rate:8,.0f} samples/s, {rate / per:8,.0f} per worker process")
    print(
        f"  loader vs bare JPEG decode, alternated: {versus['loader_ms']:.3f} vs {versus['decode_ms']:.3f} ms per "
        f"sample = {versus['ratio']:.2f}x (target <= 1.4x), {versus['rate']:,.0f} samples/s"
    )
    print(f"  stage split, ms per sample (first {args.split_samples} samples, best of 3):")
    for name, value in split.items():
        print(f"    {name:40s} {value:6.3f}")
    return [
        f"data pipeline, batch {batch}, num_workers {args.workers}: {rates[True] / per:,.0f} samples/s per worker "
        f"process with augmentation, {rates[False] / per:,.0f} without (target ≥ 1,500); best of 3, {load}",
        f"loader (augmentation on, one worker) vs the bare JPEG decode of the same shards, timed in alternation, "
        f"round with the fastest loader of 3: {versus['loader_ms']:.3f} vs {versus['decode_ms']:.3f} ms per sample "
        f"= {versus['ratio']:.2f}x (target ≤ 1.4x), {versus['rate']:,.0f} samples/s",
        "data stage split (ms per sample): " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()),
    ]


# --------------------------------------------------------------------------------------------- model


def model_config(cfg, manifest_path: str) -> tuple[dict, dict]:
    """The model section with vocabulary size and context length from the manifest (else the defaults)."""
    if Path(manifest_path).is_file():
        manifest = load_manifest(manifest_path)
        return resolve_model_section(cfg, manifest), manifest
    section = OmegaConf.to_container(cfg.model, resolve=True)
    cell = section.setdefault("cell", {})
    for key in ("vocab_size", "context_length"):
        cell[key] = cell.get(key) or DEFAULT_MODEL_CONFIG["cell"][key]
    return resolve_model_config(section), {}


def synthetic_batches(batch: int, model_cfg: dict, image_px: int, real_tokens: int, k: int, pin: bool):
    """Random batches in the loader's layout (pretrain.collate): B cells with k neighbours each. Two are made
    and cycled, so "data wait" is only the host → device copy, as behind a loader that keeps up."""
    gen = torch.Generator().manual_seed(0)
    length, vocab = model_cfg["cell"]["context_length"], model_cfg["cell"]["vocab_size"]
    real_tokens = min(real_tokens, length)

    def tokens(rows: int) -> torch.Tensor:  # (rows, L): real_tokens gene ids, then padding (id 1)
        out = torch.ones(rows, length, dtype=torch.long)
        out[:, :real_tokens] = torch.randint(GENE_OFFSET, vocab, (rows, real_tokens), generator=gen)
        return out

    radius_um = 50.0 * torch.rand(batch * k, generator=gen).sqrt()  # uniform in a 50 µm disc
    angle = 2 * torch.pi * torch.rand(batch * k, generator=gen)
    pool = [
        {
            "image": torch.randn(batch, 3, image_px, image_px, generator=gen),  # (B, 3, H, W)
            "tokens": tokens(batch),
            "nbr_tokens": tokens(batch * k),  # (B, L), (B·k, L)
            "nbr_offsets_um": torch.stack([radius_um * angle.cos(), radius_um * angle.sin()], 1),  # (B·k, 2) µm
            "nbr_batch": torch.arange(batch).repeat_interleave(k),
        }
        for _ in range(2)
    ]  # (B·k,)
    return itertools.cycle([{key: v.pin_memory() for key, v in b.items()} for b in pool] if pin else pool)


def train_steps(module, optimizer, batches, steps: int, warmup: int, device, precision: str, grad_clip: float):
    """Median seconds of each phase over ``steps`` steps after ``warmup`` (robust on a shared machine), and
    the mean longest real row of the batches (tokens: what the cell encoder's ``trim_padding`` runs)."""

    def now() -> float:  # wall clock once the device has done what was queued
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    bf16 = precision == "bf16"
    cast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    params = [p for p in module.parameters() if p.requires_grad]
    times, lengths = {name: [] for name in PHASES}, []
    for i in range(warmup + steps):
        t0 = now()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items() if isinstance(v, torch.Tensor)}
        t1 = now()
        with cast():
            out = module(batch)
        t2 = now()
        with cast():
            loss = similarity_adjusted_loss(out["img_emb"], out["cell_emb"], out["temperature"])  # no gather
        t3 = now()
        loss.backward()
        t4 = now()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = now()
        if i >= warmup:
            for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times[name].append(seconds)
            lengths.append(int(real_token_mask(batch["tokens"]).sum(1).max()))
    return {name: float(np.median(values)) for name, values in times.items()}, float(np.mean(lengths))


def model_part(args, device: torch.device) -> list[str]:
    cfg = load_config(args.config, schema=PretrainConfig)
    model_cfg, manifest = model_config(cfg, args.manifest)
    batch = args.batch or int(cfg.train.micro_batch_size)
    k = int(manifest.get("config", {}).get("neighbours", {}).get("k", 8))  # neighbours per cell
    torch.manual_seed(0)
    temperature = {f"{key}_temperature": value for key, value in cfg.train.temperature.items()}
    module = PASTTrainingModule(build_model(model_cfg), LearnableTemperature(**temperature)).to(device).train()
    optimizer = torch.optim.AdamW(
        parameter_groups(module, float(cfg.train.weight_decay)),
        lr=1e-5,
        betas=tuple(cfg.train.betas),
        eps=float(cfg.train.eps),
    )
    if args.inputs == "shards":
        images = DeviceImages((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

        def on_device(loader_batches):  # the trainer's _to_device: uint8 crops augmented on the device
            for b in loader_batches:
                moved = {k: v.to(device, non_blocking=True) for k, v in b.items() if isinstance(v, torch.Tensor)}
                colour = moved.pop("colour", None)
                moved["image"] = images(moved["image"], b["dihedral"], colour)
                yield moved

        batches = on_device(
            make_loader(
                args.manifest,
                batch,
                rank=0,
                world_size=1,
                num_workers=args.workers,
                resample=True,
                steps_per_epoch=10**6,
                pin_memory=device.type == "cuda",
            )[0]
        )
    else:
        image_px = int(getattr(module.model.image_encoder.backbone.patch_embed, "img_size", (224,))[0])
        real = args.real_tokens or model_cfg["cell"]["context_length"]
        batches = synthetic_batches(batch, model_cfg, image_px, real, k, pin=device.type == "cuda")
    phases, seq_len = train_steps(
        module, optimizer, batches, args.steps, args.warmup, device, args.precision, float(cfg.train.grad_clip or 0.0)
    )
    step_s = sum(phases.values())
    rate = batch / step_s
    flops = estimate_flops_per_sample(model_cfg, n_neighbours=k, seq_len=round(seq_len))["train"]
    tflops = rate * flops / 1e12
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"\nmodel step ({args.config}; vocabulary/context from {args.manifest if manifest else 'defaults'}; "
        f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters; {device.type} {args.precision}"
        f"{threads}; batch {batch}, {args.inputs} inputs, {k} neighbours/cell, longest real row {seq_len:.0f} "
        f"tokens; median of {args.steps} steps after {args.warmup} warm-up)"
    )
    for name, seconds in phases.items():
        print(f"  {name:15s} {1000 * seconds:9.1f} ms  {100 * seconds / step_s:5.1f} %")
    print(f"  {'step':15s} {1000 * step_s:9.1f} ms   -> {rate:,.1f} samples/s (one process: no gather, no all-reduce)")
    line = f"{flops / 1e9:,.1f} GFLOP per training sample -> {tflops:.3f} TFLOP/s achieved"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((v for key, v in PEAK_BF16_TFLOPS.items() if key in name), None)
        line += f", MFU {100 * tflops / peak:.1f} % of {peak:g} TFLOP/s" if peak else ", MFU: pass --peak-tflops"
        line += f"; peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    print(f"  {line}")
    return [
        f"model step, {Path(args.config).name}, {device.type} {args.precision}{threads}, batch {batch}, "
        f"{args.inputs} inputs (longest real row {seq_len:.0f} tokens): {rate:,.1f} samples/s per "
        f"{'GPU' if device.type == 'cuda' else 'process'}; ms per step "
        + ", ".join(f"{name} {1000 * seconds:.1f}" for name, seconds in phases.items())
        + f"; {line}"
    ]


def deepspeed_part(run_dir: Path) -> list[str]:
    """Throughput of a real DeepSpeed run (with gather and all-reduce) from its TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()

    def mean(tag: str) -> float:  # the first logged step includes start-up: left out
        values = [e.value for e in events.Scalars(tag)]
        return float(np.mean(values[1:] or values))

    per_rank = [mean(t) for t in sorted(events.Tags()["scalars"]) if t.startswith("throughput_per_rank/")]
    line = (
        f"DeepSpeed run {run_dir} ({len(per_rank)} ranks, {len(events.Scalars('time/step_s'))} logged steps): "
        f"{mean('throughput/samples_per_s'):,.1f} samples/s total, per rank "
        + " / ".join(f"{v:,.1f}" for v in per_rank)
        + f"; step {1000 * mean('time/step_s'):.1f} ms, data wait {100 * mean('time/data_wait_fraction'):.1f} %"
    )
    if (run_dir / "final_metrics.json").is_file():
        wall = json.loads((run_dir / "final_metrics.json").read_text())
        line += f"; whole run incl. start-up and checkpoints {wall['samples_per_s']:,.1f} samples/s"
    print("\n" + line)
    return [line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("data", "model", "all"), default="all")
    parser.add_argument("--manifest", default="runs/demo/shards/manifest.json")
    parser.add_argument("--config", default="configs/pretrain/tiny_cpu.yaml")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed model steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed model steps before them")
    parser.add_argument("--batch", type=int, help="default: 64 for data, the config's micro batch for the model")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes (0: the main process)")
    parser.add_argument("--split-samples", type=int, default=500, help="samples timed in the data stage split")
    parser.add_argument("--inputs", choices=("synthetic", "shards"), default="synthetic", help="model part batches")
    parser.add_argument("--real-tokens", type=int, help="synthetic real tokens per row (default: the context length)")
    parser.add_argument("--peak-tflops", type=float, help="bf16 peak per GPU for MFU (default: by GPU name)")
    parser.add_argument("--deepspeed-log", type=Path, help="a real run's out_dir, e.g. runs/demo/pretrain")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")

    lines = []
    if args.part in ("data", "all"):
        if Path(args.manifest).is_file():
            lines += data_part(args)
        elif args.part == "data":
            sys.exit(f"no shards at {args.manifest}: run `make demo` first (or pass --manifest)")
        else:
            print(f"data part skipped: no shards at {args.manifest} (run `make demo` first)")
    if args.part in ("model", "all"):
        lines += model_part(args, device)
    if args.deepspeed_log is not None:
        lines += deepspeed_part(args.deepspeed_log)
    if args.record and lines:
        if device.type == "cpu":  # others' work on the same cores shows in every CPU figure
            lines.append(f"1-minute load average at the end: {os.getloadavg()[0]:.1f}")
        with RESULTS.open("a", encoding="utf-8") as results:
            results.write(f"\n### bench/pretrain.py — {dt.datetime.now():%Y-%m-%d %H:%M} — {machine(device)}\n\n")
            results.writelines(f"- {line}\n" for line in lines)
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()

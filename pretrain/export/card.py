"""The export's README.md model card: ``card_template.md`` filled in from the export summary.

The template holds the fixed text (what the encoders are, how to load them, intended use); this
module computes the values and the optional blocks (final metrics, verification) that go into it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from string import Template
from typing import Any

from .load import TECH_MEAN_NAME, VOCAB_JSON_NAME, VOCAB_NAME

TEMPLATE_PATH = Path(__file__).with_name("card_template.md")


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "—" if value is None else str(value)


def _block(lines: list[str]) -> str:
    """Lines of an optional block, followed by one blank line."""
    return "\n".join(lines) + "\n\n"


def _cell_architecture(mc: Mapping[str, Any]) -> str:
    cell, graph = mc["cell"], mc["graph"]
    text = (
        f"transformer ({cell['layers']} layers, dim {cell['dim']}, {cell['heads']} heads, context "
        f"{cell['context_length']} tokens, vocabulary {cell['vocab_size']} ids)"
    )
    if graph["enabled"]:
        return text + (
            f" + GAT niche branch ({graph['gat_layers']} layer(s), {graph['node_encoder']} nodes, radius "
            f"{graph['radius_um']} µm) + attention fusion"
        )
    return text + " + linear projection"


def _final_metrics(summary: Mapping[str, Any]) -> str:
    metrics = summary.get("final_metrics") or {}
    if not metrics:
        return _block(["No `final_metrics.json` beside the checkpoint (the run did not finish, or ran elsewhere)."])
    text = ""
    if metrics.get("step") is not None and metrics["step"] != summary["step"]:
        text = _block(
            [
                f"(measured at the end of the run, step {metrics['step']}, not at this checkpoint's step "
                f"{summary['step']})"
            ]
        )
    return text + _block(
        [
            f"Means over the last {_fmt(metrics.get('window_steps'))} training steps "
            f"(global micro batch {_fmt(metrics.get('global_micro_batch'))}):",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| loss | {_fmt(metrics.get('loss'))} |",
            f"| retrieval top-1, image → cell | {_fmt(metrics.get('retrieval_top1_img_to_cell'))} |",
            f"| retrieval top-1, cell → image | {_fmt(metrics.get('retrieval_top1_cell_to_img'))} |",
            f"| chance | {_fmt(metrics.get('chance'))} |",
            f"| temperature τ | {_fmt(metrics.get('temperature'))} |",
        ]
    )


def _verification(summary: Mapping[str, Any]) -> str:
    differences = summary.get("verification_max_abs_difference")
    if not differences:
        return ""
    return _block(
        [
            "## Verification",
            "",
            "Reloaded from these files, the encoders reproduce the checkpoint's model (max |difference|: "
            + ", ".join(f"{k} {v:.1e}" for k, v in differences.items())
            + ").",
        ]
    )


def render_model_card(summary: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> str:
    """README.md of the export: what the encoders are, how to load them, how they were trained."""
    mc = summary["model"]
    image = summary["image_encoder"]
    data = summary["data"]
    target_um_per_px = image["crop"].get("target_um_per_px")
    values = {
        "license": summary.get("license") or "other",
        "proj_dim": mc["proj_dim"],
        "image_arch": image["architecture"],
        "image_kwargs": json.dumps(image["model_args"]),
        "image_head": mc["image"]["head"],
        "num_features": image["num_features"],
        "cell_architecture": _cell_architecture(mc),
        "input_height": image["input_size"][1],
        "input_width": image["input_size"][2],
        "crop_resolution": (
            f" at {target_um_per_px} µm/pixel" if target_um_per_px else " at the slide's level-0 resolution"
        ),
        "context_length": tokenizer["context_length"],
        "assay": tokenizer["assay"],
        "modality": tokenizer["modality"],
        "organism": tokenizer["organism"],
        "vocab_file": VOCAB_NAME,
        "vocab_json": VOCAB_JSON_NAME,
        "tech_mean_file": f" and `cell_encoder/{TECH_MEAN_NAME}`" if tokenizer.get("tech_mean") else "",
        "checkpoint_dir": summary["source"]["checkpoint_dir"],
        "tag": summary["source"]["tag"],
        "step": summary["step"],
        "epoch": _fmt(summary.get("epoch")),
        "samples_seen": _fmt(summary.get("samples_seen")),
        "manifest": data["manifest"],
        "manifest_sha256": data["manifest_sha256"],
        "n_samples": _fmt(data["n_samples"]),
        "n_shards": _fmt(data["n_shards"]),
        "n_slides": len(data["slides"]),
        "vocabulary_size": data["vocabulary_size"],
        "vocabulary_sha256": data["vocabulary_sha256"],
        "temperature": _fmt(summary.get("temperature")),
        "final_metrics": _final_metrics(summary),
        "verification": _verification(summary),
        "files": "\n".join(f"| `{name}` | `{digest}` |" for name, digest in summary["files"].items()),
    }
    return Template(TEMPLATE_PATH.read_text(encoding="utf-8")).substitute(values)

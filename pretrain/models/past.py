"""The PAST model: an H&E crop encoder and a spatially aware expression encoder, one joint space.

Batch dict (what the data pipeline must produce; B cells, L = model.cell.context_length tokens,
N = total neighbours of all B cells):

| key              | shape        | dtype          | meaning |
| ---------------- | ------------ | -------------- | ------- |
| `image`          | (B, 3, H, W) | float          | H&E crop centred on the cell, normalised with the backbone's mean/std; H = W = 224 px for the paper's ViT |
| `tokens`         | (B, L)       | int64 or int32 | rank tokens (0 mask, 1 pad, 2 cls, 3–29 assay/modality/organism, gene i = 30 + i); padding (1) contiguous at the end |
| `nbr_tokens`     | (N, L)       | int64 or int32 | rank tokens of every neighbour of every cell, concatenated |
| `nbr_offsets_um` | (N, 2)       | float          | neighbour centroid minus centre centroid, µm |
| `nbr_batch`      | (N,)         | int64          | row of `tokens` each neighbour belongs to (any order; a cell may have 0..k neighbours) |

The three `nbr_*` keys may be omitted (or N = 0): every cell then has no neighbours. Token ids must
be < model.cell.vocab_size; the pipeline checks the shards' vocabulary hash against the config.

`PASTModel.forward(batch)` returns `img_emb` (B, proj_dim) and `cell_emb` (B, proj_dim), both
L2-normalised, plus `img_feat` (B, backbone features), `cell_feat` (B, cell dim, the pooled
transformer feature) and, with the graph branch on, `graph_feat` (B, cell dim).

Configuration (``model.*``; defaults are the paper's values where the paper states them):

| key                         | default                  | paper / note |
| --------------------------- | ------------------------ | ------------ |
| image.preset                | null                     | "uni": UNI's ViT-L/16 (LayerScale init_values 1e-5, see IMAGE_PRESETS) |
| image.arch                  | vit_large_patch16_224    | ViT-L/16, 1024-d CLS feature |
| image.kwargs                | {}                       | timm kwargs (img_size, depth, embed_dim, ...); over the preset's |
| image.weights               | null                     | local .safetensors/.pth/.bin of the bare backbone (e.g. UNI's pytorch_model.bin) |
| image.head                  | linear                   | "linear" or "mlp" (2 layers, GELU) to proj_dim |
| cell.dim                    | 512                      | paper |
| cell.heads                  | 16                       | paper |
| cell.ff_dim                 | 1024                     | paper |
| cell.layers                 | 12                       | paper |
| cell.context_length         | 300                      | paper |
| cell.vocab_size             | 20340                    | 30 reserved + Nicheformer's 20,310 genes |
| cell.dropout                | 0.0                      | our choice |
| cell.trim_padding           | true                     | exact; cuts compute on batches of short rows (on an accelerator: prepare_host_batch) |
| graph.enabled               | true                     | false: cell_emb = Linear(transformer feature) |
| graph.node_encoder          | tokens                   | "tokens": paper, h⁰ = Embed(G) mean-pooled; "transformer" (~(1+k)× cell cost) or "bag" |
| graph.gat_layers            | 2                        | not stated in the paper; our choice |
| graph.gat_heads             | 4                        | our choice |
| graph.hidden                | 256                      | our choice |
| graph.radius_um             | 25.0                     | neighbour↔neighbour edges below this (µm); null: star graph only |
| graph.edge_features         | rbf                      | "rbf" (rbf_bins Gaussians + scaled length) or "distance" |
| graph.rbf_bins              | 16                       | |
| graph.max_distance_um       | 50.0                     | RBF range and distance scale, µm |
| graph.dropout               | 0.0                      | GAT attention dropout |
| fusion.heads                | 8                        | our choice |
| proj_dim                    | 256                      | paper |
| grad_checkpointing          | false                    | activation checkpointing in the cell transformer and the ViT |
| compile                     | false                    | the trainer torch.compiles the image backbone and cell transformer (compile_towers) |

On an accelerator, :func:`prepare_host_batch` (the trainer calls it on the host before moving a
batch) trims the token padding and builds the niche graph's edges (keys `nbr_edge_index` (2, E)
int64, `nbr_edge_length_um` (E,) float32), so the forward runs without a host sync.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.errors import InputError

from .cell_encoder import CellEncoder, trim_token_padding
from .fusion import AttentionFusion, fusion_flops
from .graph import GraphBranch, build_neighbour_graph, gat_flops, star_graph_edges
from .image_encoder import ImageTower, create_backbone

log = logging.getLogger(__name__)

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "image": {"preset": None, "arch": "vit_large_patch16_224", "kwargs": {}, "weights": None, "head": "linear"},
    "cell": {
        "dim": 512,
        "heads": 16,
        "ff_dim": 1024,
        "layers": 12,
        "context_length": 300,
        "vocab_size": 20340,
        "dropout": 0.0,
        "trim_padding": True,
    },
    "graph": {
        "enabled": True,
        "node_encoder": "tokens",
        "gat_layers": 2,
        "gat_heads": 4,
        "hidden": 256,
        "radius_um": 25.0,
        "edge_features": "rbf",
        "rbf_bins": 16,
        "max_distance_um": 50.0,
        "dropout": 0.0,
    },
    "fusion": {"heads": 8},
    "proj_dim": 256,
    "grad_checkpointing": False,
    "compile": False,
}
_FREE_FORM = {"model.image.kwargs"}  # sections whose keys are not ours to check

# Image towers of published pathology foundation models, as timm builds them (weights: a local file,
# model.image.weights). UNI (Chen et al. 2024, MahmoodLab/UNI): ViT-L/16 at 224 px with LayerScale.
IMAGE_PRESETS: dict[str, dict[str, Any]] = {
    "uni": {
        "arch": "vit_large_patch16_224",
        "kwargs": {"img_size": 224, "patch_size": 16, "init_values": 1.0e-5, "dynamic_img_size": True},
    },
}


def resolve_model_config(cfg: Mapping | DictConfig | None) -> dict[str, Any]:
    """Full config or its ``model`` section → plain dict of the model section over the defaults."""
    if cfg is None:
        cfg = {}
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    if isinstance(cfg.get("model"), Mapping):
        cfg = dict(cfg["model"])
    merged = _merge(DEFAULT_MODEL_CONFIG, cfg, "model")
    return _apply_image_preset(merged, dict(cfg.get("image") or {}))


def _apply_image_preset(merged: dict, given_image: Mapping) -> dict:
    """model.image.preset: the preset's arch and kwargs, the given kwargs over them (idempotent)."""
    image = merged["image"]
    name = image.get("preset")
    if name is None:
        return merged
    if name not in IMAGE_PRESETS:
        raise InputError(None, "model.image.preset", f"null or one of {sorted(IMAGE_PRESETS)}", name)
    preset = IMAGE_PRESETS[name]
    if "arch" in given_image and given_image["arch"] != preset["arch"]:
        raise InputError(
            None, "model.image.arch", f"{preset['arch']} (model.image.preset={name}) or no arch", given_image["arch"]
        )
    image["arch"] = preset["arch"]
    image["kwargs"] = {**preset["kwargs"], **dict(image.get("kwargs") or {})}
    return merged


def _merge(defaults: Mapping, given: Mapping, prefix: str) -> dict:
    merged = copy.deepcopy(dict(defaults))
    for key, value in given.items():
        name = f"{prefix}.{key}"
        if key not in defaults:
            close = difflib.get_close_matches(str(key), list(defaults), n=1, cutoff=0.5)
            hint = f"a known key (did you mean `{prefix}.{close[0]}`?); " if close else ""
            raise InputError(None, name, f"{hint}one of the keys of {prefix}: {sorted(defaults)}", "an unknown key")
        if isinstance(defaults[key], Mapping) and name not in _FREE_FORM:
            if not isinstance(value, Mapping):
                raise InputError(None, name, "a section (mapping)", value)
            merged[key] = _merge(defaults[key], value, name)
        else:
            merged[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return merged


class PASTModel(nn.Module):
    """Image tower and cell tower (transformer + optional GAT niche branch + attention fusion)."""

    def __init__(
        self,
        image_encoder: ImageTower,
        cell_encoder: CellEncoder,
        graph: GraphBranch | None,
        fusion: AttentionFusion | None,
        proj_dim: int,
        config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.cell_encoder = cell_encoder
        self.graph = graph
        self.fusion = fusion
        # Without the niche branch the transformer feature goes straight to the joint space.
        self.cell_proj = nn.Linear(cell_encoder.dim, proj_dim) if graph is None else None
        self.proj_dim = proj_dim
        self.config = copy.deepcopy(dict(config or {}))  # resolved model config, for export

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_encoder.set_grad_checkpointing(enable)
        self.cell_encoder.set_grad_checkpointing(enable)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by branch: image, cell (transformer), graph, fusion (or the plain projection)."""
        head = self.fusion if self.fusion is not None else self.cell_proj
        groups = {"image": self.image_encoder, "cell": self.cell_encoder, "graph": self.graph, "fusion": head}
        return {name: list(module.parameters()) for name, module in groups.items() if module is not None}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) → L2-normalised embeddings (B, proj_dim)."""
        return F.normalize(self.image_encoder(images), dim=-1)

    def encode_cell(
        self,
        tokens: torch.Tensor,
        nbr_tokens: torch.Tensor | None = None,
        nbr_offsets_um: torch.Tensor | None = None,
        nbr_batch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, L) (+ neighbours, see the module docstring) → L2-normalised (B, proj_dim)."""
        return F.normalize(self.cell_features(tokens, nbr_tokens, nbr_offsets_um, nbr_batch)["cell_out"], dim=-1)

    def cell_features(
        self, tokens, nbr_tokens=None, nbr_offsets_um=None, nbr_batch=None, edges=None
    ) -> dict[str, torch.Tensor]:
        """Intermediate features: cell_feat (B, D), graph_feat (B, D) if any, cell_out (B, proj_dim).

        edges: the niche graph's (edge_index, edge_length_um) when built already (prepare_host_batch)."""
        n_centres = tokens.shape[0]
        if self.graph is None:
            cell_feat = self.cell_encoder(tokens)
            return {"cell_feat": cell_feat, "cell_out": self.cell_proj(cell_feat)}
        nbr_tokens, nbr_offsets_um, nbr_batch = self._neighbours(tokens, nbr_tokens, nbr_offsets_um, nbr_batch)
        if self.graph.node_encoder == "transformer":
            # One pass over centres and neighbours: the centre's node feature is its cell feature.
            features = self.cell_encoder(torch.cat([tokens, nbr_tokens.to(tokens.dtype)]))  # (B + N, D)
            cell_feat = features[:n_centres]
            node_feat = self.graph.node_features(None, None, cell_feat, features[n_centres:])
        else:
            cell_feat = self.cell_encoder(tokens)
            node_feat = self.graph.node_features(
                tokens, nbr_tokens.to(tokens.dtype), token_embedding=self.cell_encoder.token_embedding.weight
            )
        graph_feat = self.graph(node_feat, n_centres, nbr_offsets_um, nbr_batch, edges)  # (B, D)
        return {"cell_feat": cell_feat, "graph_feat": graph_feat, "cell_out": self.fusion(cell_feat, graph_feat)}

    @staticmethod
    def _neighbours(tokens, nbr_tokens, nbr_offsets_um, nbr_batch):
        given = [x is not None for x in (nbr_tokens, nbr_offsets_um, nbr_batch)]
        if not any(given):
            return (
                tokens.new_zeros((0, tokens.shape[1])),
                torch.zeros((0, 2), device=tokens.device),
                torch.zeros((0,), dtype=torch.long, device=tokens.device),
            )
        if not all(given):
            raise InputError(None, "batch", "all or none of nbr_tokens, nbr_offsets_um, nbr_batch", f"given: {given}")
        n = nbr_tokens.shape[0]
        if nbr_tokens.dim() != 2 or nbr_tokens.shape[1] != tokens.shape[1]:
            raise InputError(None, "nbr_tokens", f"(N, {tokens.shape[1]}) like tokens", tuple(nbr_tokens.shape))
        if tuple(nbr_offsets_um.shape) != (n, 2):
            raise InputError(None, "nbr_offsets_um", f"({n}, 2) µm offsets", tuple(nbr_offsets_um.shape))
        if tuple(nbr_batch.shape) != (n,):
            raise InputError(None, "nbr_batch", f"({n},) centre indices", tuple(nbr_batch.shape))
        return nbr_tokens, nbr_offsets_um, nbr_batch.long()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key in ("image", "tokens"):
            if key not in batch:
                raise InputError(None, f"batch['{key}']", "a tensor (see pretrain.models.past)", "missing")
        img_feat = self.image_encoder.features(batch["image"])  # (B, backbone features)
        img_out = self.image_encoder.head(img_feat)  # (B, proj_dim)
        edges = None
        if batch.get("nbr_edge_index") is not None:
            edges = (batch["nbr_edge_index"], batch["nbr_edge_length_um"])
        cell = self.cell_features(
            batch["tokens"], batch.get("nbr_tokens"), batch.get("nbr_offsets_um"), batch.get("nbr_batch"), edges
        )
        out = {
            "img_emb": F.normalize(img_out, dim=-1),
            "cell_emb": F.normalize(cell["cell_out"], dim=-1),
            "img_feat": img_feat,
            "cell_feat": cell["cell_feat"],
        }
        if "graph_feat" in cell:
            out["graph_feat"] = cell["graph_feat"]
        return out


def build_model(cfg: Mapping | DictConfig | None = None) -> PASTModel:
    """PASTModel from a config (full, or its ``model`` section); missing keys take the defaults."""
    mc = resolve_model_config(cfg)
    image, cell, graph = mc["image"], mc["cell"], mc["graph"]
    image_encoder = ImageTower(
        image["arch"], image["kwargs"], image["weights"], mc["proj_dim"], image["head"], mc["grad_checkpointing"]
    )
    cell_encoder = CellEncoder(
        vocab_size=cell["vocab_size"],
        dim=cell["dim"],
        heads=cell["heads"],
        ff_dim=cell["ff_dim"],
        layers=cell["layers"],
        context_length=cell["context_length"],
        dropout=cell["dropout"],
        trim_padding=cell["trim_padding"],
        grad_checkpointing=mc["grad_checkpointing"],
    )
    graph_branch = fusion = None
    if graph["enabled"]:
        graph_branch = GraphBranch(
            cell_dim=cell["dim"],
            vocab_size=cell["vocab_size"],
            context_length=cell["context_length"],
            node_encoder=graph["node_encoder"],
            hidden=graph["hidden"],
            gat_layers=graph["gat_layers"],
            gat_heads=graph["gat_heads"],
            radius_um=graph["radius_um"],
            edge_features=graph["edge_features"],
            rbf_bins=graph["rbf_bins"],
            max_distance_um=graph["max_distance_um"],
            dropout=graph["dropout"],
        )
        fusion = AttentionFusion(cell["dim"], mc["fusion"]["heads"], mc["proj_dim"])
    model = PASTModel(image_encoder, cell_encoder, graph_branch, fusion, mc["proj_dim"], config=mc)
    log.info("PAST model: %.1fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


# ---------------------------------------------------------------------------------------------
# FLOPs


def transformer_flops(seq_len: int, dim: int, ff_dim: int, layers: int) -> int:
    """Forward FLOPs of the cell transformer on one sequence (matmuls and attention)."""
    per_layer = (
        2 * seq_len * dim * 3 * dim  # qkv
        + 2 * 2 * seq_len * seq_len * dim  # scores and weighted values
        + 2 * seq_len * dim * dim  # attention output
        + 2 * 2 * seq_len * dim * ff_dim  # feed-forward
    )
    return layers * per_layer


def image_backbone_flops(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> int:
    """Forward FLOPs of one image through the timm backbone (analytic for ViTs)."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        backbone = create_backbone(arch, arch_kwargs)
    if isinstance(backbone, VisionTransformer):
        patch = backbone.patch_embed.proj.weight  # (D, C, p, p)
        n_patches = backbone.patch_embed.num_patches
        n_tokens = n_patches + backbone.num_prefix_tokens
        flops = 2 * n_patches * patch[0].numel() * patch.shape[0]
        linear_weights = sum(m.weight.numel() for m in backbone.blocks.modules() if isinstance(m, nn.Linear))
        flops += 2 * n_tokens * linear_weights
        flops += len(backbone.blocks) * 2 * 2 * n_tokens * n_tokens * backbone.embed_dim
        return int(flops)
    # Other families: count the meta-device forward (no memory, no compute).
    from torch.utils.flop_counter import FlopCounterMode

    size = backbone.pretrained_cfg.get("input_size", (3, 224, 224))
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        backbone(torch.empty(1, *size))
    return int(counter.get_total_flops())


def estimate_flops_per_sample(
    model_cfg: Mapping | DictConfig | None = None, n_neighbours: int = 8, seq_len: int | None = None
) -> dict[str, int]:
    """Analytic forward FLOPs per (image, cell) pair, by component, and the training total.

    Counts matmuls, attention and the GAT's per-edge work; norms, activations and embedding
    look-ups are left out (the MFU convention). Assumes every cell has ``n_neighbours``
    neighbours, rows of ``seq_len`` real tokens (default: the context length; with
    ``trim_padding`` real batches may cost less) and, when ``radius_um`` is set, every pair of
    neighbours within it (an upper bound).

    Keys: image_encoder, cell_encoder, node_encoder_transformer, node_encoder_tokens, node_encoder_bag, node_encoder
    (the configured one; 0 without the graph), gat, fusion, forward, train (= 3 × forward).
    """
    mc = resolve_model_config(model_cfg)
    image, cell, graph = mc["image"], mc["cell"], mc["graph"]
    proj_dim, dim, hidden, k = mc["proj_dim"], cell["dim"], graph["hidden"], n_neighbours
    length = cell["context_length"] if seq_len is None else seq_len

    backbone = image_backbone_flops(image["arch"], image["kwargs"])
    with torch.device("meta"):
        width = create_backbone(image["arch"], image["kwargs"]).num_features
    head = 2 * width * proj_dim if image["head"] == "linear" else 2 * width * width + 2 * width * proj_dim
    one_cell = transformer_flops(length, dim, cell["ff_dim"], cell["layers"])
    flops = {
        "image_encoder": backbone + head,
        "cell_encoder": one_cell,
        # The centre reuses the cell encoder's output; all k + 1 nodes are projected to hidden.
        "node_encoder_transformer": k * one_cell + 2 * (k + 1) * dim * hidden,
        "node_encoder_tokens": (k + 1) * (2 * length * dim + 2 * dim * hidden),
        "node_encoder_bag": (k + 1) * 2 * length * hidden,
    }
    if graph["enabled"]:
        edge_dim = 1 + (graph["rbf_bins"] if graph["edge_features"] == "rbf" else 0)
        edges = star_graph_edges(k, graph["radius_um"] is not None)
        flops["node_encoder"] = flops[f"node_encoder_{graph['node_encoder']}"]
        flops["gat"] = gat_flops(k + 1, edges, hidden, edge_dim, graph["gat_layers"]) + 2 * hidden * dim
        flops["fusion"] = fusion_flops(dim, proj_dim)
    else:
        flops.update(node_encoder=0, gat=0, fusion=2 * dim * proj_dim)
    flops["forward"] = sum(flops[key] for key in ("image_encoder", "cell_encoder", "node_encoder", "gat", "fusion"))
    flops["train"] = 3 * flops["forward"]
    return {key: int(value) for key, value in flops.items()}


def compile_towers(model: PASTModel) -> PASTModel:
    """``torch.compile`` the image backbone and the cell transformer in place (``model.compile: true``;
    the trainer calls it, export and inference never do). State-dict keys are unchanged. Token
    padding is trimmed to a varying width, so the cell transformer recompiles once and then treats
    that dimension as dynamic."""
    model.image_encoder.backbone.compile()
    model.cell_encoder.compile()
    return model


def prepare_host_batch(batch: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A loader batch with the work that needs data-dependent sizes done on the host (CPU) tensors.

    Token padding every row shares is cut (``cell.trim_padding``; ``tokens`` and ``nbr_tokens`` to one
    width) and, with the niche branch on, the graph's edges are built (``nbr_edge_index``,
    ``nbr_edge_length_um``), so that :meth:`PASTModel.forward` on the device reads no size back. The
    model's outputs are the same as for the untouched batch. Other keys pass through.
    """
    out = dict(batch)
    tokens = out.get("tokens")
    if not isinstance(tokens, torch.Tensor) or tokens.device.type != "cpu":
        return out
    nbr_tokens = out.get("nbr_tokens")
    if model_cfg["cell"]["trim_padding"]:
        if isinstance(nbr_tokens, torch.Tensor):
            out["tokens"], out["nbr_tokens"] = trim_token_padding(tokens, nbr_tokens)
        else:
            (out["tokens"],) = trim_token_padding(tokens)
    graph = model_cfg["graph"]
    offsets, nbr_batch = out.get("nbr_offsets_um"), out.get("nbr_batch")
    if graph["enabled"] and isinstance(offsets, torch.Tensor) and isinstance(nbr_batch, torch.Tensor):
        out["nbr_edge_index"], out["nbr_edge_length_um"] = build_neighbour_graph(
            tokens.shape[0], offsets, nbr_batch.long(), graph["radius_um"]
        )
    return out

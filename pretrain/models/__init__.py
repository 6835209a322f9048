"""The PAST model: ViT image encoder | rank-token transformer + GAT niche branch, one joint space.

See ``pretrain.models.past`` for the batch dict, the outputs and the configuration table.
"""

from .cell_encoder import CellEncoder, real_token_mask, trim_token_padding
from .fusion import AttentionFusion
from .graph import NODE_ENCODERS, BagNodeEncoder, EdgeFeatures, GraphBranch, build_neighbour_graph
from .image_encoder import IMAGENET_MEAN, IMAGENET_STD, ImageTower, create_backbone, load_backbone_weights
from .past import (
    DEFAULT_MODEL_CONFIG,
    IMAGE_PRESETS,
    PASTModel,
    build_model,
    compile_towers,
    estimate_flops_per_sample,
    prepare_host_batch,
    resolve_model_config,
    transformer_flops,
)

__all__ = [
    "AttentionFusion",
    "BagNodeEncoder",
    "CellEncoder",
    "DEFAULT_MODEL_CONFIG",
    "EdgeFeatures",
    "GraphBranch",
    "NODE_ENCODERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_PRESETS",
    "ImageTower",
    "PASTModel",
    "build_model",
    "build_neighbour_graph",
    "compile_towers",
    "create_backbone",
    "estimate_flops_per_sample",
    "load_backbone_weights",
    "prepare_host_batch",
    "real_token_mask",
    "resolve_model_config",
    "transformer_flops",
    "trim_token_padding",
]

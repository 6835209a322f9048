"""The PAST model: ViT image encoder | rank-token transformer + GAT niche branch, one joint space.

See ``pretrain.models.past`` for the batch dict, the outputs and the configuration table.
"""

from .cell_encoder import CellEncoder, real_token_mask
from .fusion import AttentionFusion
from .graph import BagNodeEncoder, EdgeFeatures, GraphBranch, build_neighbour_graph
from .image_encoder import IMAGENET_MEAN, IMAGENET_STD, ImageTower, create_backbone, load_backbone_weights
from .past import (
    DEFAULT_MODEL_CONFIG,
    PASTModel,
    build_model,
    estimate_flops_per_sample,
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
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTower",
    "PASTModel",
    "build_model",
    "build_neighbour_graph",
    "create_backbone",
    "estimate_flops_per_sample",
    "load_backbone_weights",
    "real_token_mask",
    "resolve_model_config",
    "transformer_flops",
]

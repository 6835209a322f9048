"""Fusion of the cell's own (transformer) feature with its niche (graph) feature.

Multi-head attention with the transformer feature as the only query and the two features
[transformer, graph] as keys and values (each LayerNorm-ed first: the branches have different
scales), an output linear, then a projection to the joint space. The query decides per head how
much of the niche to take in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import InputError


class AttentionFusion(nn.Module):
    """cell_feat (B, D), graph_feat (B, D) → (B, proj_dim), not normalised."""

    def __init__(self, dim: int, heads: int = 8, proj_dim: int = 256):
        super().__init__()
        if dim % heads:
            raise InputError(None, "model.fusion.heads", f"a divisor of model.cell.dim={dim}", heads)
        self.heads = heads
        self.norm_cell = nn.LayerNorm(dim)
        self.norm_graph = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, proj_dim)

    def forward(self, cell_feat: torch.Tensor, graph_feat: torch.Tensor) -> torch.Tensor:
        b, dim = cell_feat.shape
        head_dim = dim // self.heads
        sources = torch.stack([self.norm_cell(cell_feat), self.norm_graph(graph_feat)], dim=1)  # (B, 2, D)
        q = self.query(sources[:, :1]).view(b, 1, self.heads, head_dim).transpose(1, 2)  # (B, h, 1, D/h)
        k, v = self.key_value(sources).view(b, 2, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)  # 2 × (B, h, 2, D/h)
        fused = F.scaled_dot_product_attention(q, k, v)  # (B, h, 1, D/h)
        return self.proj(self.out(fused.transpose(1, 2).reshape(b, dim)))


def fusion_flops(dim: int, proj_dim: int) -> int:
    """Forward FLOPs per sample: query, keys/values of 2 tokens, attention, output, projection."""
    return 2 * dim * dim + 2 * 2 * dim * 2 * dim + 2 * 2 * 2 * dim + 2 * dim * dim + 2 * dim * proj_dim

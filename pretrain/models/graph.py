"""Spatial niche branch: a small graph per centre cell, a GAT, a feature for the centre.

Graph of one centre cell: node 0 is the centre (position 0 µm), the other nodes are its
neighbours from the shard (position = ``nbr_offsets_um``, neighbour minus centre, µm). Edges:
centre ↔ each neighbour (both directions), a self-loop on every node (distance 0), and, when
``radius_um`` is set, neighbour ↔ neighbour for pairs closer than ``radius_um``. Every edge
carries features of its length in µm: an RBF expansion over [0, max_distance_um]
(``edge_features="rbf"``, ``rbf_bins`` Gaussians, plus the length / max_distance_um) or the
scaled length alone (``"distance"``). Features depend on distance only, so the branch is
invariant to rotations and flips of the slide.

The whole batch is one disjoint PyG graph built with tensor ops (no Python loop over cells):
nodes 0..B-1 are the centres, node B + j is row j of ``nbr_tokens``.

Node features come from each cell's tokens through learned layers, three encoders by config:
- ``"tokens"`` (default): the paper's h⁰ = Embed(G): the mean over real tokens of the cell
  transformer's own token embeddings (shared weights), then Linear(cell dim → hidden). Cost ≈
  (k + 1)·(L·dim + 2·dim·hidden) FLOPs per sample, negligible.
- ``"transformer"``: the shared cell transformer on each neighbour (the centre reuses the cell
  encoder's output), then Linear(cell dim → hidden). Richer than the paper's formula; cost ≈
  (1 + k) × the cell encoder.
- ``"bag"``: a learned bag of token embeddings (hidden-d) weighted by a learned weight per rank
  position (initialised to 1 / log2(rank + 2)) and averaged over real tokens, then LayerNorm.
  Cost ≈ 2·L·hidden FLOPs per node, thousands of times cheaper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATConv

from common.errors import InputError

from .cell_encoder import real_token_mask

NODE_ENCODERS = ("tokens", "transformer", "bag")


def build_neighbour_graph(
    n_centres: int,
    nbr_offsets_um: torch.Tensor,
    nbr_batch: torch.Tensor,
    radius_um: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges of the batched star(+radius) graphs.

    n_centres B; nbr_offsets_um (N, 2) µm; nbr_batch (N,) int64 in [0, B).
    Returns edge_index (2, E) int64 (row 0 source, row 1 target) over B + N nodes and
    edge_length_um (E,) float32.
    """
    device = nbr_offsets_um.device
    nbr_offsets_um = nbr_offsets_um.float()  # µm need more precision than bf16 offers
    n_nbr = nbr_batch.shape[0]
    centre = nbr_batch.long()
    nbr_node = torch.arange(n_nbr, device=device) + n_centres
    length = torch.linalg.vector_norm(nbr_offsets_um, dim=-1)  # (N,)
    all_nodes = torch.arange(n_centres + n_nbr, device=device)
    sources = [centre, nbr_node, all_nodes]
    targets = [nbr_node, centre, all_nodes]
    lengths = [length, length, torch.zeros(n_centres + n_nbr, dtype=length.dtype, device=device)]
    if radius_um is not None and n_nbr > 1:
        src, dst, pair_length = _neighbour_pairs(n_centres, nbr_offsets_um, centre, radius_um)
        sources.append(src)
        targets.append(dst)
        lengths.append(pair_length)
    edge_index = torch.stack([torch.cat(sources), torch.cat(targets)])
    return edge_index, torch.cat(lengths)


def _neighbour_pairs(n_centres: int, offsets_um: torch.Tensor, centre: torch.Tensor, radius_um: float):
    """Ordered pairs (i ≠ j) of neighbours of the same centre closer than radius_um."""
    device = offsets_um.device
    n_nbr = centre.shape[0]
    order = torch.argsort(centre, stable=True)
    counts = torch.bincount(centre, minlength=n_centres)  # (B,)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(order)
    slot[order] = torch.arange(n_nbr, device=device) - starts[centre[order]]  # rank within its cell
    k_max = int(counts.max())
    # Dense per-cell layout (B, k_max): positions and node ids, so pairs cost O(B·k²), not O(N²).
    node_id = torch.full((n_centres, k_max), -1, dtype=torch.long, device=device)
    node_id[centre, slot] = torch.arange(n_nbr, device=device) + n_centres
    pos = offsets_um.new_zeros(n_centres, k_max, 2)
    pos[centre, slot] = offsets_um
    dist = torch.cdist(pos, pos)  # (B, k_max, k_max) µm
    valid = node_id >= 0
    keep = valid[:, :, None] & valid[:, None, :] & (dist < radius_um)
    keep &= ~torch.eye(k_max, dtype=torch.bool, device=device)
    b, i, j = keep.nonzero(as_tuple=True)
    return node_id[b, i], node_id[b, j], dist[b, i, j]


class EdgeFeatures(nn.Module):
    """Edge length (E,) µm → (E, dim) features; no parameters."""

    def __init__(self, kind: str = "rbf", rbf_bins: int = 16, max_distance_um: float = 50.0):
        super().__init__()
        if kind not in ("rbf", "distance"):
            raise InputError(None, "model.graph.edge_features", "'rbf' or 'distance'", kind)
        if not max_distance_um > 0:
            raise InputError(None, "model.graph.max_distance_um", "a positive distance in µm", max_distance_um)
        self.kind = kind
        self.max_distance_um = float(max_distance_um)
        self.rbf_bins = rbf_bins
        self.width_um = max_distance_um / max(rbf_bins - 1, 1)
        self.dim = 1 + (rbf_bins if kind == "rbf" else 0)

    def forward(self, length_um: torch.Tensor) -> torch.Tensor:
        # Computed in float32: bf16 has ~3 significant digits, too coarse for µm distances.
        length_um = length_um.float()
        scaled = (length_um / self.max_distance_um)[:, None]  # (E, 1)
        if self.kind == "distance":
            return scaled
        centres_um = torch.linspace(0.0, self.max_distance_um, self.rbf_bins, device=length_um.device)
        rbf = torch.exp(-(((length_um[:, None] - centres_um) / self.width_um) ** 2))  # (E, bins)
        return torch.cat([rbf, scaled], dim=1)


class BagNodeEncoder(nn.Module):
    """(N, L) tokens → (N, hidden): rank-weighted mean of learned token embeddings."""

    def __init__(self, vocab_size: int, hidden: int, context_length: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(vocab_size, hidden) * 0.02)
        self.rank_weight = nn.Parameter(1.0 / torch.log2(torch.arange(context_length, dtype=torch.float32) + 2.0))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        real = real_token_mask(tokens)  # (N, L)
        weights = self.rank_weight[: tokens.shape[1]].to(self.embedding.dtype) * real.to(self.embedding.dtype)
        weights = weights / real.sum(1, keepdim=True).clamp(min=1).to(weights.dtype)
        # embedding_bag never materialises the (N, L, hidden) tensor.
        bag = F.embedding_bag(tokens.long(), self.embedding, per_sample_weights=weights, mode="sum")  # (N, hidden)
        return self.norm(bag)


class GraphBranch(nn.Module):
    """Node features + multi-layer GAT → (B, out_dim) feature of each centre cell."""

    def __init__(
        self,
        cell_dim: int,
        vocab_size: int,
        context_length: int,
        node_encoder: str = "tokens",
        hidden: int = 256,
        gat_layers: int = 2,
        gat_heads: int = 4,
        radius_um: float | None = 25.0,
        edge_features: str = "rbf",
        rbf_bins: int = 16,
        max_distance_um: float = 50.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if node_encoder not in NODE_ENCODERS:
            raise InputError(None, "model.graph.node_encoder", f"one of {NODE_ENCODERS}", node_encoder)
        if hidden % gat_heads:
            raise InputError(None, "model.graph.gat_heads", f"a divisor of model.graph.hidden={hidden}", gat_heads)
        self.node_encoder = node_encoder
        self.radius_um = radius_um
        if node_encoder == "bag":
            self.bag = BagNodeEncoder(vocab_size, hidden, context_length)
        else:
            self.node_proj = nn.Linear(cell_dim, hidden)
        # Tells the GAT which node is the centre: its neighbours' positions are all relative to it.
        self.role_embedding = nn.Embedding(2, hidden)
        self.edge_features = EdgeFeatures(edge_features, rbf_bins, max_distance_um)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(gat_layers))
        self.convs = nn.ModuleList(
            GATConv(
                hidden,
                hidden // gat_heads,
                heads=gat_heads,
                edge_dim=self.edge_features.dim,
                add_self_loops=False,
                dropout=dropout,
            )
            for _ in range(gat_layers)
        )
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, cell_dim)

    def node_features(
        self, centre_tokens, nbr_tokens, centre_feat=None, nbr_feat=None, token_embedding=None
    ) -> torch.Tensor:
        """(B + N, hidden) features: from encoder outputs (transformer), the cell transformer's token
        embeddings ``token_embedding`` (vocab, cell dim) mean-pooled (tokens), or a bag (bag)."""
        if self.node_encoder == "bag":
            return self.bag(torch.cat([centre_tokens, nbr_tokens]))
        if self.node_encoder == "tokens":
            tokens = torch.cat([centre_tokens, nbr_tokens])
            real = real_token_mask(tokens).to(token_embedding.dtype)  # (B + N, L)
            weights = real / real.sum(1, keepdim=True).clamp(min=1)
            pooled = F.embedding_bag(tokens.long(), token_embedding, per_sample_weights=weights, mode="sum")
            return self.node_proj(pooled)
        return self.node_proj(torch.cat([centre_feat, nbr_feat]))

    def forward(
        self,
        node_feat: torch.Tensor,
        n_centres: int,
        nbr_offsets_um: torch.Tensor,
        nbr_batch: torch.Tensor,
        edges: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """node_feat (B + N, hidden), centres first → (B, cell_dim) graph feature of each centre.

        edges: (edge_index, edge_length_um) of :func:`build_neighbour_graph` for this batch when the
        caller built them already (on the host, :func:`pretrain.models.prepare_host_batch`: building
        them on an accelerator needs two host syncs); None builds them here."""
        if edges is None:
            edges = build_neighbour_graph(n_centres, nbr_offsets_um, nbr_batch, self.radius_um)
        edge_index, length_um = edges
        dtype = node_feat.dtype
        edge_attr = self.edge_features(length_um).to(dtype)  # (E, edge_dim)
        is_centre = torch.arange(node_feat.shape[0], device=node_feat.device) < n_centres
        x = node_feat + self.role_embedding(is_centre.long())
        for norm, conv in zip(self.norms, self.convs):
            x = x + F.elu(conv(norm(x), edge_index, edge_attr))
        return self.out(self.norm_out(x[:n_centres]))


def gat_flops(n_nodes: int, n_edges: int, hidden: int, edge_dim: int, layers: int) -> int:
    """Forward FLOPs of the GAT stack on one graph (matmuls, attention logits, messages)."""
    per_layer = (
        2 * n_nodes * hidden * hidden  # node linear
        + 2 * n_edges * edge_dim * hidden  # edge linear
        + 2 * (2 * n_nodes + n_edges) * hidden  # attention logits (source, target, edge)
        + 2 * n_edges * hidden  # weighted messages summed at targets
    )
    return layers * per_layer


def star_graph_edges(k: int, radius_edges: bool) -> int:
    """Edges of one centre with k neighbours: 2k spokes + (k + 1) self-loops (+ k(k-1) pairs at most)."""
    return 2 * k + (k + 1) + (k * (k - 1) if radius_edges else 0)

"""Expression encoder: a transformer over a cell's rank tokens, mean-pooled over real tokens.

Input rows follow the Nicheformer scheme written by ``data_shards.tokenize.rank_tokens``:
``[assay, modality, organism, gene ids by descending normalised rank ..., pad, pad, ...]`` with
ids 0 mask, 1 pad, 2 cls, 3–29 assay/modality/organism, gene i = 30 + i.

A token is *real* when it comes before the row's first pad (id 1). Padding is contiguous at the
end of a row by construction, so defining the mask by position makes the embedding independent of
whatever sits after the first pad. Padded keys are masked out of attention and padded positions
out of the mean pool, which makes trimming a batch to its longest real row exact
(``trim_padding``): it only saves compute.

Block: pre-norm (LayerNorm → multi-head self-attention via
``torch.nn.functional.scaled_dot_product_attention`` → residual; LayerNorm → Linear → GELU →
Linear → residual), a final LayerNorm before pooling. Pre-norm is our choice for stable bf16
training; positions are learnable (context_length × dim), so rank order matters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.errors import InputError
from data_shards.vocabulary import GENE_OFFSET, PAD  # Nicheformer ids: 1 pad; 0–29 reserved, genes from 30


def real_token_mask(tokens: torch.Tensor, pad_id: int = PAD) -> torch.Tensor:
    """(N, L) tokens → (N, L) bool, True before each row's first pad."""
    return torch.cumsum(tokens == pad_id, dim=1) == 0


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise InputError(None, "model.cell.heads", f"a divisor of model.cell.dim={dim}", heads)
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x (N, L, D); attn_mask (N, 1, 1, L) bool (True = attend) or None → (N, L, D)."""
        n, length, dim = x.shape
        # (N, L, 3D) → 3 × (N, heads, L, D/heads)
        q, k, v = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.out(attn.transpose(1, 2).reshape(n, length, dim)))
        return x + self.drop(self.ff(self.norm2(x)))


class CellEncoder(nn.Module):
    """(N, L) rank tokens → (N, dim) pooled features (mean over real tokens)."""

    def __init__(
        self,
        vocab_size: int,
        dim: int = 512,
        heads: int = 16,
        ff_dim: int = 1024,
        layers: int = 12,
        context_length: int = 300,
        dropout: float = 0.0,
        trim_padding: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if vocab_size <= GENE_OFFSET:
            raise InputError(None, "model.cell.vocab_size", f"30 + number of genes (> {GENE_OFFSET})", vocab_size)
        self.vocab_size = vocab_size
        self.dim = dim
        self.context_length = context_length
        self.trim_padding = trim_padding
        self.grad_checkpointing = grad_checkpointing
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(context_length, dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        self.embed_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, ff_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L ≤ context_length) int → (N, dim)."""
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise InputError(None, "tokens", f"(N, L ≤ {self.context_length}) integer tensor", tuple(tokens.shape))
        real = real_token_mask(tokens)  # (N, L)
        attn_mask = None
        if tokens.shape[0] and tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            # On the CPU reading the lengths costs nothing: an exact trim and, for unpadded batches,
            # the mask-free attention kernel. On an accelerator that read would be a host sync in the
            # forward, so there the batch is trimmed before it is moved (trim_token_padding, which
            # the trainer applies on the host) and the mask is always used.
            longest, shortest = torch.stack([real.sum(1).max(), real.sum(1).min()]).tolist()
            keep = max(int(longest), 1) if self.trim_padding else tokens.shape[1]
            tokens, real = tokens[:, :keep], real[:, :keep]
            if shortest < keep:
                attn_mask = real
        else:
            attn_mask = real
        if attn_mask is not None:
            # A row without real tokens would give NaN attention; let it attend everywhere
            # (its pooled feature is zero anyway).
            attn_mask = (attn_mask | ~attn_mask.any(1, keepdim=True))[:, None, None, :]  # (N, 1, 1, L)
        length = tokens.shape[1]
        x = self.embed_drop(self.token_embedding(tokens) + self.position_embedding[:length])  # (N, L, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        x = self.norm(x)
        weights = real.to(x.dtype).unsqueeze(-1)  # (N, L, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (N, D)


def trim_token_padding(tokens: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cut the padding columns every row of ``tokens`` (and of ``others``, same width) shares at the end.

    Exact for :class:`CellEncoder` (padding is masked out of attention and pooling, positions are
    unchanged). Meant for host (CPU) tensors before they are moved to the device, where the length
    read is free: :meth:`CellEncoder.forward` on an accelerator does not trim, to avoid a host sync.
    """
    rows = [t for t in (tokens, *others) if t.shape[0]]
    if not rows:
        return (tokens, *others)
    longest = max(int(real_token_mask(t).sum(1).max()) for t in rows)
    keep = max(longest, 1)
    return tuple(t[:, :keep] for t in (tokens, *others))

"""MCAT survival model (Chen et al., ICCV 2021) over PAST patch embeddings, and its loss.

MCAT: Multimodal Co-Attention Transformer. Each patient is

* a bag of patch embeddings from all their slides, (N_patches, D_image), and
* genomic features split into G signature groups (six in MCAT), each a vector of its own length.

The forward pass, with d the model width (256 in MCAT)::

    genomic group g ──SNN_g──▶ token (d)           → genomic tokens   (B, G, d)
    patches ──Linear+ReLU──▶ (B, N, d)
    co-attention: queries = genomic tokens, keys/values = patches (padding masked)
                                                   → genomic-guided path tokens (B, G, d)
    each side: transformer encoder → gated attention pooling (Ilse et al. 2018) → (B, d)
    concatenation (B, 2d) → MLP → n_bins logits → hazards = sigmoid(logits)   (B, n_bins)

Discrete-time survival: hazard h_k = P(event in bin k | alive at its start), survival
S_k = Π_{j≤k}(1 − h_j); the risk score is −Σ_k S_k (higher = earlier death), as in MCAT.

PAST-multi adds one genomic token: the patient's mean cell-encoder embedding through its own
SNN, so the model has G + 1 genomic tokens and G + 1 co-attended path tokens.

Modes (`mode`): "mcat" (both modalities), "pathology" (gated-attention MIL over the patch bag,
MCAT's AMIL baseline), "genomic" (SNN tokens → transformer → pooling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

MODES = ("pathology", "genomic", "mcat")


def snn_block(in_features: int, out_features: int, dropout: float = 0.25) -> nn.Sequential:
    """Self-normalising block (Klambauer et al. 2017): Linear → ELU → AlphaDropout."""
    return nn.Sequential(nn.Linear(in_features, out_features), nn.ELU(), nn.AlphaDropout(dropout))


def _init_snn(module: nn.Module) -> None:
    # SELU-style initialisation keeps the activations of the self-normalising nets near N(0, 1).
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
            nn.init.zeros_(layer.bias)


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018): a_i ∝ exp(w·(tanh(V h_i) ⊙ σ(U h_i))).

    tokens (B, N, d), optional pad mask (B, N) True where padding → pooled (B, d), weights (B, N).
    """

    def __init__(self, dim: int, hidden: int | None = None, dropout: float = 0.25):
        super().__init__()
        hidden = hidden or dim
        self.value = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None):
        scores = self.score(self.value(tokens) * self.gate(tokens)).squeeze(-1)  # (B, N)
        if pad_mask is not None:
            scores = scores.masked_fill(pad_mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, N)
        return torch.einsum("bn,bnd->bd", weights, tokens), weights


class _TokenSummary(nn.Module):
    """Transformer encoder over a few tokens, then gated attention pooling and a projection (ρ)."""

    def __init__(self, dim: int, n_heads: int, n_layers: int, dropout: float):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, n_heads, dim_feedforward=2 * dim, dropout=dropout, activation="relu", batch_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.pool = GatedAttentionPool(dim, dropout=dropout)
        self.rho = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None):
        tokens = self.transformer(tokens, src_key_padding_mask=pad_mask)  # (B, T, d)
        pooled, weights = self.pool(tokens, pad_mask)  # (B, d), (B, T)
        return self.rho(pooled), weights


class MCAT(nn.Module):
    """MCAT and its single-modality baselines; see the module docstring.

    Arguments: `image_dim` D_image of the patch embeddings; `group_sizes` the number of omic
    features in each signature group; `cell_dim` the length of the mean cell-encoder embedding
    (PAST-multi) or None; `dim` the model width d; `n_bins` the hazard bins.

    forward(patches (B, N, D_image), patch_mask (B, N) True = padding, omics list of G tensors
    (B, n_g), cell (B, cell_dim) or None) → dict with `logits`, `hazards`, `survival` (B, n_bins),
    `risk` (B,), and the attention weights that were used.
    """

    def __init__(
        self,
        image_dim: int,
        group_sizes: Sequence[int],
        cell_dim: int | None = None,
        dim: int = 256,
        n_bins: int = 4,
        mode: str = "mcat",
        n_heads: int = 8,
        n_layers: int = 2,
        dropout: float = 0.25,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "pathology" and cell_dim is not None:
            raise ValueError("the pathology-only baseline takes no cell embedding")
        self.mode, self.dim, self.n_bins = mode, dim, n_bins
        self.uses_image = mode in ("pathology", "mcat")
        self.uses_omics = mode in ("genomic", "mcat")
        self.uses_cells = cell_dim is not None

        if self.uses_image:
            self.patch_proj = nn.Sequential(nn.Linear(image_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        if self.uses_omics:
            self.group_nets = nn.ModuleList(
                nn.Sequential(snn_block(n, dim, dropout), snn_block(dim, dim, dropout)) for n in group_sizes
            )
            if self.uses_cells:
                self.cell_net = nn.Sequential(snn_block(cell_dim, dim, dropout), snn_block(dim, dim, dropout))
            _init_snn(self.group_nets)
            if self.uses_cells:
                _init_snn(self.cell_net)

        if mode == "pathology":
            self.path_pool = GatedAttentionPool(dim, dropout=dropout)
            self.path_rho = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
            fused = dim
        elif mode == "genomic":
            self.omic_summary = _TokenSummary(dim, n_heads, n_layers, dropout)
            fused = dim
        else:
            # one head, as in MCAT: each genomic query gets one attention map over the patches
            self.coattention = nn.MultiheadAttention(dim, num_heads=1, batch_first=True)
            self.path_summary = _TokenSummary(dim, n_heads, n_layers, dropout)
            self.omic_summary = _TokenSummary(dim, n_heads, n_layers, dropout)
            fused = 2 * dim
        self.fusion = nn.Sequential(nn.Linear(fused, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.classifier = nn.Linear(dim, n_bins)

    def _genomic_tokens(self, omics: Sequence[torch.Tensor], cell: torch.Tensor | None) -> torch.Tensor:
        if len(omics) != len(self.group_nets):
            raise ValueError(f"expected {len(self.group_nets)} omic groups, got {len(omics)}")
        tokens = [net(x) for net, x in zip(self.group_nets, omics)]  # G × (B, d)
        if self.uses_cells:
            if cell is None:
                raise ValueError("this model was built for PAST-multi and needs the mean cell embedding")
            tokens.append(self.cell_net(cell))
        return torch.stack(tokens, dim=1)  # (B, G[+1], d)

    def forward(
        self,
        patches: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        omics: Sequence[torch.Tensor] | None = None,
        cell: torch.Tensor | None = None,
    ) -> dict:
        out: dict[str, torch.Tensor] = {}
        if self.uses_image:
            if patch_mask is not None and bool(patch_mask.all(dim=1).any()):
                raise ValueError("a patient has an empty patch bag (every patch masked)")
            path = self.patch_proj(patches)  # (B, N, D_image) → (B, N, d)
        if self.uses_omics:
            genomic = self._genomic_tokens(omics, cell)  # (B, G', d)

        if self.mode == "pathology":
            pooled, out["patch_attention"] = self.path_pool(path, patch_mask)
            features = self.path_rho(pooled)  # (B, d)
        elif self.mode == "genomic":
            features, out["omic_attention"] = self.omic_summary(genomic)
        else:
            # genomic-guided co-attention: each genomic token attends over the patient's patches
            guided, out["coattention"] = self.coattention(
                genomic, path, path, key_padding_mask=patch_mask, need_weights=True
            )  # (B, G', d), (B, G', N)
            path_feature, out["path_attention"] = self.path_summary(guided)
            omic_feature, out["omic_attention"] = self.omic_summary(genomic)
            features = torch.cat([path_feature, omic_feature], dim=-1)  # (B, 2d)

        logits = self.classifier(self.fusion(features))  # (B, n_bins)
        hazards = torch.sigmoid(logits)
        survival = torch.cumprod(1 - hazards, dim=1)
        out.update(logits=logits, hazards=hazards, survival=survival, risk=-survival.sum(dim=1))
        return out


def nll_survival_loss(
    hazards: torch.Tensor, bin_index: torch.Tensor, censored: torch.Tensor, alpha: float = 0.0, eps: float = 1e-7
) -> torch.Tensor:
    """Discrete-time negative log-likelihood (Zadeh & Schmid 2020), as in MCAT's code.

    hazards (B, K) in (0, 1); bin_index (B,) the bin k of each patient's time; censored (B,)
    1 where the patient was censored (alive at last follow-up), 0 where the event was observed.
    With S_{-1} = 1 and S_k = Π_{j≤k}(1 − h_j):

    * an observed event in bin k:  −log S_{k−1} − log h_k  (alive until bin k, died in it);
    * censored in bin k:           −log S_k                (alive through the end of bin k).

    The loss is the batch mean of (1 − α)·(both terms) + α·(the uncensored term), which up-weights
    observed events for α > 0. Probabilities are clamped at `eps` before the log.
    """
    censored = censored.to(hazards.dtype).view(-1, 1)  # (B, 1)
    k = bin_index.long().view(-1, 1)  # (B, 1)
    survival = torch.cumprod(1 - hazards, dim=1)
    survival_padded = torch.cat([torch.ones_like(censored), survival], dim=1)  # (B, K+1): S_{-1}, S_0, ...
    survival_before = survival_padded.gather(1, k)  # S_{k-1}
    survival_through = survival_padded.gather(1, k + 1)  # S_k
    hazard_at = hazards.gather(1, k)  # h_k
    uncensored = -(1 - censored) * (torch.log(survival_before.clamp(min=eps)) + torch.log(hazard_at.clamp(min=eps)))
    censored_term = -censored * torch.log(survival_through.clamp(min=eps))
    loss = (1 - alpha) * (censored_term + uncensored) + alpha * uncensored
    return loss.mean()


def pad_bags(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of (N_i, D) → padded (B, max N_i, D) and a mask (B, max N_i), True where padding."""
    padded = nn.utils.rnn.pad_sequence(list(bags), batch_first=True)
    lengths = torch.tensor([len(b) for b in bags])
    mask = torch.arange(padded.shape[1])[None, :] >= lengths[:, None]
    return padded, mask


__all__ = ["MODES", "MCAT", "GatedAttentionPool", "nll_survival_loss", "pad_bags", "snn_block"]

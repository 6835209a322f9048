"""The PAST objective: a CLIP loss whose targets are softened by within-modality similarity.

For a global batch of B cell/image pairs with L2-normalised embeddings c_i, m_i (B, D) and a
temperature τ:

    logits  = c · mᵀ / τ                                   (B, B)  cell → image
    S       = (c · cᵀ + m · mᵀ) / (2τ)                     (B, B)  symmetric similarity
    targets = softmax_row(S)
    loss    = ½ [ CE(logits, targets) + CE(logitsᵀ, targetsᵀ) ]

where CE(z, t) = mean_i −Σ_j t_ij log softmax(z_i)_j. Pairs of cells that look alike in both
modalities are thus not pushed apart as hard as in plain CLIP. As in BLEEP (Xie et al. 2023,
where this soft-target CLIP loss for histology/expression pairs comes from), the image → cell
direction uses targetsᵀ literally: targets is a row-softmax, so targetsᵀ (the column-softmax
of S) differs from it and its rows need not sum to 1 (they do on average), which weights each
image by how much the other pairs' targets point at it. Using targets itself in both
directions would be the normalised alternative; we keep the published formula.

Target mixing (`target_mix` = λ ∈ [0, 1], default 1 = the PAST objective above):

    targets_λ = (1 − λ) · I + λ · targets        (and (1 − λ) · I + λ · targetsᵀ the other way)

λ = 0 is CLIP's hard-target loss. The targets come from the model's own embeddings, nearly
identical at random initialisation, so they start almost uniform. With detached targets the
λ = 1 loss can then collapse to ln(B) and stay (below); starting as CLIP (λ ramped from 0,
`loss.target_mix` in pretrain.trainer) spreads the embeddings first. With gradient through the
targets (the default) the shipped configs use λ = 1 from step 0, the paper's objective.

Gradient through the targets (``detach_targets=False``, the default, as in the authors' and
BLEEP's code). Detaching them (treating them as labels, ``detach_targets=True``) looks
harmless but makes "every cell embedding equals its image embedding, all alike" a stationary
point: with every embedding equal, the targets are uniform, the logits are uniform and a
cross-entropy of uniform logits against fixed uniform labels has zero gradient. Measured on
the tiny CPU config with λ = 1 from step 0 (configs/pretrain/tiny_cpu.yaml, 1 process, batch
32, 3 epochs): detached, two of three seeds sat at ln 32 = 3.466 to the end (top-1 0.04–0.07,
chance 0.031), as did the 2-rank run of issue #12; with gradient through the targets all three
learned (loss 2.70–2.79, top-1 0.11–0.13). pretrain.collapse stops a run stuck there.

Distributed: with torch.distributed initialised, embeddings are gathered from every rank with
gradient and each rank computes only its block of rows (B_local rows × B global columns) in
both directions, each row softmax running over the whole global batch (open_clip's
`local_loss=True, gather_with_grad=True`). The rank's differentiable loss L_r is the mean over
its rows, so the full-batch loss is L = mean_r L_r; all_gather's backward sends each rank
Σ_r ∂L_r/∂(its rows), and DeepSpeed/DDP's average of parameter gradients over ranks then
gives exactly ∂L/∂θ. The VALUE returned is the global L on every rank (L_r plus a detached
correction), so logging and tests see the same number as a single process holding the batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.errors import InputError
from pretrain.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_mean,
    all_reduce_sum,
    check_equal_local_batch,
    is_distributed,
    rank,
)

TEMPERATURE_MIN = 0.01
TEMPERATURE_MAX = 1.0


class LearnableTemperature(nn.Module):
    """Learnable softmax temperature τ, bounded by construction:

        τ = min + (max − min) · sigmoid(raw + raw_init)

    where ``raw`` (the parameter, shape (1,), state-dict key ``raw``) starts at 0 and ``raw_init``
    (a Python float fixed by the bounds and init_temperature, not a tensor) puts τ at
    init_temperature. Whatever value an optimizer gives ``raw`` (its own copy, DeepSpeed's fp32
    master under any ZeRO stage, a partitioned shard), τ lies in [min, max]: there is nothing to
    clamp after the step, so no master weight can escape the bounds and no gradient is cut off
    (the clamp of earlier versions returned zero gradient once the master passed a bound).

    Precision: τ is computed in float32 (float64 for float64 parameters) whatever the
    parameter's dtype. Under DeepSpeed bf16 the forward sees a bf16 copy of ``raw``; storing it
    as an offset from its initial value keeps that copy near 0, where bf16 is fine-grained
    (within |raw| ≤ 1 one bf16 step moves τ by < 0.7 %, against 1.6 % for a bf16 log(1/τ) at τ = 0.07).

    Checkpoints written before this parametrisation hold ``logit_scale`` = log(1/τ); loading
    one converts it to ``raw`` (τ clipped just inside the bounds). Exclude ``raw`` from weight decay
    (it is 1-d, so :func:`pretrain.training_module.parameter_groups` does).
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        min_temperature: float = TEMPERATURE_MIN,
        max_temperature: float = TEMPERATURE_MAX,
    ):
        super().__init__()
        if not 0 < min_temperature < max_temperature or not min_temperature < init_temperature < max_temperature:
            raise InputError(
                None,
                "train.temperature",
                "0 < min < init < max (init strictly inside the bounds)",
                (min_temperature, init_temperature, max_temperature),
            )
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.raw_init = self._logit_of(float(init_temperature))
        self.raw = nn.Parameter(torch.zeros(1))

    def _logit_of(self, temperature: float) -> float:
        """sigmoid⁻¹ of τ's position between the bounds (τ strictly inside them)."""
        u = (temperature - self.min_temperature) / (self.max_temperature - self.min_temperature)
        return math.log(u / (1.0 - u))

    def forward(self) -> torch.Tensor:
        """τ as a 0-dim float32 (or float64) tensor in [min, max], differentiable w.r.t. ``raw``."""
        raw = self.raw.to(torch.promote_types(self.raw.dtype, torch.float32)).reshape(())
        span = self.max_temperature - self.min_temperature
        return self.min_temperature + span * torch.sigmoid(raw + self.raw_init)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        legacy = state_dict.get(prefix + "logit_scale")
        if legacy is not None and prefix + "raw" not in state_dict:
            tau = math.exp(-float(legacy.reshape(-1)[0]))
            margin = 1e-6 * (self.max_temperature - self.min_temperature)
            tau = min(max(tau, self.min_temperature + margin), self.max_temperature - margin)
            state_dict = dict(state_dict)
            del state_dict[prefix + "logit_scale"]
            state_dict[prefix + "raw"] = torch.tensor([self._logit_of(tau) - self.raw_init])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    @property
    def temperature(self) -> float:
        """Current τ as a Python float (for logging)."""
        return float(self.forward().detach())


def _check_embedding_pair(img_emb: torch.Tensor, cell_emb: torch.Tensor, check_normalized: bool) -> None:
    for name, emb in (("img_emb", img_emb), ("cell_emb", cell_emb)):
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise InputError(None, name, "a non-empty (B, D) tensor of embeddings", tuple(emb.shape))
        if not emb.is_floating_point():
            raise InputError(None, name, "a floating-point tensor", emb.dtype)
    if img_emb.shape != cell_emb.shape:
        raise InputError(
            None,
            "img_emb/cell_emb",
            "the same (B, D) shape for both modalities",
            (tuple(img_emb.shape), tuple(cell_emb.shape)),
        )
    if check_normalized:  # costs a device sync, so only on request
        for name, emb in (("img_emb", img_emb), ("cell_emb", cell_emb)):
            norms = emb.detach().float().norm(dim=-1)
            if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
                raise InputError(
                    None,
                    name,
                    "L2-normalised rows (norm 1)",
                    f"norms in [{norms.min().item():.4g}, {norms.max().item():.4g}]",
                )


def _as_temperature(temperature: float | torch.Tensor | LearnableTemperature) -> float | torch.Tensor:
    if isinstance(temperature, LearnableTemperature):
        return temperature()
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise InputError(None, "temperature", "a scalar", tuple(temperature.shape))
        return temperature.reshape(())
    if not temperature > 0:
        raise InputError(None, "temperature", "a positive number", temperature)
    return float(temperature)


def _as_target_mix(target_mix: float | torch.Tensor) -> float:
    value = float(target_mix)
    if not 0.0 <= value <= 1.0:
        raise InputError(None, "target_mix", "a number in [0, 1] (1: PAST soft targets, 0: CLIP hard targets)", value)
    return value


def _block_loss(
    img_rows: torch.Tensor,
    cell_rows: torch.Tensor,
    img_all: torch.Tensor,
    cell_all: torch.Tensor,
    temperature: float | torch.Tensor,
    detach_targets: bool,
    group: dist.ProcessGroup | None,
    target_mix: float = 1.0,
    row_offset: int = 0,
) -> torch.Tensor:
    """Mean over the given rows of the two-direction soft-target loss against all columns.

    img_rows, cell_rows: (B_rows, D), the rows this process is responsible for.
    img_all, cell_all: (B, D), the whole (global) batch; columns of every softmax.
    target_mix: λ, the weight of the soft targets (1 − λ goes to the identity, i.e. CLIP).
    row_offset: global index of the first row (where each row's own pair sits among the columns).
    """
    logits_cell_to_img = cell_rows @ img_all.T / temperature  # (B_rows, B): rows of logits
    logits_img_to_cell = img_rows @ cell_all.T / temperature  # (B_rows, B): rows of logitsᵀ
    # S = (c·cᵀ + m·mᵀ)/(2τ) is symmetric, so S[rows] also gives the rows of Sᵀ.
    similarity = (cell_rows @ cell_all.T + img_rows @ img_all.T) / (2 * temperature)  # (B_rows, B)
    if detach_targets:
        similarity = similarity.detach()
    # targets = row-softmax(S); targetsᵀ[i, j] = targets[j, i] = exp(S[i, j] − logsumexp(S[j, :])),
    # which needs every global row's log-normaliser: one (B,) gather.
    row_log_normaliser = torch.logsumexp(similarity, dim=-1)  # (B_rows,)
    if is_distributed(group):
        gather = all_gather_no_grad if detach_targets else all_gather_with_grad
        all_row_log_normaliser = gather(row_log_normaliser, group)  # (B,)
    else:
        all_row_log_normaliser = row_log_normaliser
    targets_rows = torch.exp(similarity - row_log_normaliser[:, None])  # rows of targets, each sums to 1
    targets_t_rows = torch.exp(similarity - all_row_log_normaliser[None, :])  # rows of targetsᵀ
    log_p_cell_to_img = F.log_softmax(logits_cell_to_img, dim=-1)  # (B_rows, B)
    log_p_img_to_cell = F.log_softmax(logits_img_to_cell, dim=-1)
    loss_cell_to_img = -(targets_rows * log_p_cell_to_img).sum(-1)  # (B_rows,)
    loss_img_to_cell = -(targets_t_rows * log_p_img_to_cell).sum(-1)
    if target_mix != 1.0:
        # CE against (1 − λ)·I + λ·targets = (1 − λ)·CE(identity) + λ·CE(targets): own pair = column row_offset + i.
        own = torch.arange(log_p_cell_to_img.shape[0], device=log_p_cell_to_img.device) + row_offset
        hard_cell_to_img = -log_p_cell_to_img.gather(1, own[:, None]).squeeze(1)
        hard_img_to_cell = -log_p_img_to_cell.gather(1, own[:, None]).squeeze(1)
        loss_cell_to_img = (1.0 - target_mix) * hard_cell_to_img + target_mix * loss_cell_to_img
        loss_img_to_cell = (1.0 - target_mix) * hard_img_to_cell + target_mix * loss_img_to_cell
    return 0.5 * (loss_cell_to_img.mean() + loss_img_to_cell.mean())


def similarity_adjusted_loss(
    img_emb: torch.Tensor,
    cell_emb: torch.Tensor,
    temperature: float | torch.Tensor | LearnableTemperature,
    *,
    group: dist.ProcessGroup | None = None,
    detach_targets: bool = False,
    check_normalized: bool = False,
    target_mix: float = 1.0,
) -> torch.Tensor:
    """The PAST similarity-adjusted contrastive loss over the global batch (module docstring).

    img_emb, cell_emb: (B_local, D) L2-normalised embeddings of the same cells, row i of one
    paired with row i of the other; every rank must hold the same B_local. They are not
    re-normalised here (pass `check_normalized=True` to verify, at the cost of a device sync).
    temperature: τ as a float, a 0-dim tensor (learnable) or a LearnableTemperature.
    Computed in at least float32 whatever the input dtype (bf16 logits / B-way softmax lose
    too much precision). target_mix: λ in [0, 1], the targets are (1 − λ)·I + λ·softmax(S);
    the default 1 is the PAST objective, 0 is CLIP's hard-target loss. Returns a 0-dim tensor whose value is the full-batch loss on every
    rank and whose gradients, averaged over ranks, are the full-batch gradients.
    """
    _check_embedding_pair(img_emb, cell_emb, check_normalized)
    tau = _as_temperature(temperature)
    mix = _as_target_mix(target_mix)
    compute_dtype = torch.promote_types(img_emb.dtype, torch.float32)
    img_rows, cell_rows = img_emb.to(compute_dtype), cell_emb.to(compute_dtype)
    if isinstance(tau, torch.Tensor):
        tau = tau.to(compute_dtype)

    if not is_distributed(group):
        return _block_loss(img_rows, cell_rows, img_rows, cell_rows, tau, detach_targets, group, mix)

    check_equal_local_batch(img_rows.shape[0], group, what="img_emb/cell_emb")
    img_all = all_gather_with_grad(img_rows, group)  # (B, D), B = world_size · B_local
    cell_all = all_gather_with_grad(cell_rows, group)
    local_loss = _block_loss(
        img_rows, cell_rows, img_all, cell_all, tau, detach_targets, group, mix, rank(group) * img_rows.shape[0]
    )
    # Report the global value while keeping this rank's gradient (see module docstring).
    return local_loss + (all_reduce_mean(local_loss, group) - local_loss.detach())


@torch.no_grad()
def retrieval_accuracy(
    img_emb: torch.Tensor,
    cell_emb: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
) -> tuple[float, float]:
    """Top-1 cross-modal retrieval accuracy on the global batch, for logging.

    img_emb, cell_emb: (B_local, D) embeddings (cosine similarity is used, so normalisation is
    optional). Returns (image → cell, cell → image): the fraction of images whose most similar
    cell in the global batch is their own cell, and vice versa. Each rank scores its own rows
    against the gathered columns and the counts are summed, so memory stays B_local × B.
    """
    _check_embedding_pair(img_emb, cell_emb, check_normalized=False)
    img_rows = F.normalize(img_emb.float(), dim=-1)
    cell_rows = F.normalize(cell_emb.float(), dim=-1)
    check_equal_local_batch(img_rows.shape[0], group, what="img_emb/cell_emb")
    img_all = all_gather_no_grad(img_rows, group)  # (B, D)
    cell_all = all_gather_no_grad(cell_rows, group)
    own_column = torch.arange(img_rows.shape[0], device=img_rows.device) + rank(group) * img_rows.shape[0]
    correct = torch.stack(
        [
            ((img_rows @ cell_all.T).argmax(dim=-1) == own_column).sum(),  # image → cell
            ((cell_rows @ img_all.T).argmax(dim=-1) == own_column).sum(),  # cell → image
        ]
    ).to(torch.float64)
    fractions = all_reduce_sum(correct, group) / img_all.shape[0]
    return float(fractions[0]), float(fractions[1])

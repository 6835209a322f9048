"""Small torch.distributed helpers for the contrastive loss: rank queries and gathers.

Every helper degrades to the single-process behaviour when torch.distributed is not
initialised (or the group has one member), so the same code runs in tests, on one GPU and
under `deepspeed`.

`all_gather_with_grad` is the piece the loss relies on: it concatenates every rank's
(B_local, ...) tensor into (world_size · B_local, ...) and, in backward, hands each rank the
SUM over ranks of the gradients that flowed into its own slice. That is what makes
"each rank computes its block of rows of the global loss" add up to the full-batch gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.errors import InputError


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in the group; 1 without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in the group; 0 without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0


def _uses_nccl(group: dist.ProcessGroup | None) -> bool:
    return dist.get_backend(group) == dist.Backend.NCCL


def _gather_concat(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B_local, ...) on every rank -> (world_size · B_local, ...), rank order, no autograd."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns, to each rank, the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        ctx.rows = tensor.shape[0]
        return _gather_concat(tensor, group)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        # grad_gathered: (world_size · B_local, ...), this rank's dLoss_r/d(gathered).
        # Rank s needs sum_r dLoss_r/d(slice s): a reduce-scatter. Gloo has no reduce-scatter,
        # so there an all-reduce followed by taking our slice gives the same numbers.
        grad_gathered = grad_gathered.contiguous()
        group = ctx.group
        if _uses_nccl(group):
            grad_local = torch.empty(
                (ctx.rows, *grad_gathered.shape[1:]), dtype=grad_gathered.dtype, device=grad_gathered.device
            )
            dist.reduce_scatter_tensor(grad_local, grad_gathered, op=dist.ReduceOp.SUM, group=group)
        else:
            summed = grad_gathered.clone()
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
            start = dist.get_rank(group) * ctx.rows
            grad_local = summed[start : start + ctx.rows]
        return grad_local, None


def check_equal_local_batch(local_rows: int, group: dist.ProcessGroup | None = None, what: str = "batch") -> None:
    """Raise InputError on every rank unless all ranks hold the same number of rows.

    The gathered layout (rank r owns rows r·B_local … (r+1)·B_local − 1) needs equal local batch
    sizes; the loader is meant to give every rank the same number of full batches.
    """
    if not is_distributed(group):
        return
    device = torch.device("cuda", torch.cuda.current_device()) if _uses_nccl(group) else torch.device("cpu")
    sizes = _gather_concat(torch.tensor([local_rows], dtype=torch.long, device=device), group).tolist()
    if len(set(sizes)) != 1:
        raise InputError(
            None,
            f"{what} rows per rank",
            "the same local batch size on every rank (drop_last / equal batches per rank)",
            sizes,
        )


def all_gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's (B_local, ...) tensor into (world_size · B_local, ...), keeping autograd.

    Backward gives each rank the gradient of the total over ranks of their losses w.r.t. its own
    rows (like open_clip's `gather_features(..., gather_with_grad=True)`). Without
    torch.distributed it returns the tensor unchanged.
    """
    if not is_distributed(group):
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's (B_local, ...) tensor into (world_size · B_local, ...), detached."""
    if not is_distributed(group):
        return tensor.detach()
    return _gather_concat(tensor.detach(), group)


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of a detached tensor over ranks (a copy; the input is left alone)."""
    total = tensor.detach().clone()
    if is_distributed(group):
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean of a detached tensor over ranks (a copy; the input is left alone)."""
    return all_reduce_sum(tensor, group) / world_size(group)

"""Low-rank adaptation (LoRA, Hu et al. 2021, arXiv:2106.09685) of a ViT's query and value projections.

MIPHEI-ViT (Balezo et al. 2025) fine-tunes its foundation-model encoder by freezing every weight
and training a rank-8 update of the query and value projections of each attention block. This
module does the same for any timm ViT:

- :class:`LoRALinear` wraps a frozen ``nn.Linear`` and adds ``scale · B(A(x))`` (``scale =
  alpha / rank``, as in the LoRA paper; MIPHEI's own code multiplies by ``alpha`` alone, which at
  their rank 8 / alpha 1 is a constant factor 8 on the update that Adam's per-parameter step
  sizes largely absorb). ``A`` (rank × in) starts Kaiming-uniform, ``B`` (out × rank) at zero, so
  a fresh wrapper computes exactly what the base layer did. ``out_slices`` restricts the update to
  parts of a fused output: timm's ViT attention computes ``[q | k | v] = qkv(x)`` with one Linear,
  and only the q and v thirds are adapted (k stays the pretrained projection).
- :func:`apply_lora` finds the attention projections of a timm ViT (fused ``attn.qkv``, fused
  ``attn.kv``, or separate ``q_proj``/``v_proj``/``attn.q``/``attn.v`` Linears), wraps them and
  freezes every other parameter.
- :func:`merge_lora` folds the updates back into plain ``nn.Linear`` weights for export;
  :func:`lora_state_dict` / :func:`lora_parameters` give the adapter weights alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from common.errors import InputError

PROJECTIONS = ("q", "k", "v")
# Name of a Linear inside an attention block → which projections its output holds, in order.
# Fused layers split their output into equal parts (timm: qkv = [q | k | v], kv = [k | v]).
_LAYOUTS = {
    "qkv": ("q", "k", "v"),
    "kv": ("k", "v"),
    "q_proj": ("q",),
    "k_proj": ("k",),
    "v_proj": ("v",),
    "q": ("q",),
    "k": ("k",),
    "v": ("v",),
}


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update on (parts of) its output.

    ``out_slices``: ``[(start, stop), ...]`` ranges of output features to adapt, each with its own
    A/B pair (MIPHEI keeps separate q and v adapters); None adapts the whole output. The base
    layer's parameters are frozen here, whatever they were.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 8,
        alpha: float = 1.0,
        out_slices: Sequence[tuple[int, int]] | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise InputError(None, "lora.base", "an nn.Linear to wrap", type(base).__name__)
        if int(rank) < 1:
            raise InputError(None, "lora.rank", "a rank >= 1", rank)
        if not 0.0 <= float(dropout) < 1.0:
            raise InputError(None, "lora.dropout", "a dropout probability in [0, 1)", dropout)
        slices = [(0, base.out_features)] if out_slices is None else [(int(a), int(b)) for a, b in out_slices]
        _check_slices(slices, base.out_features)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        self.out_slices = tuple(sorted(slices))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterList(
            [
                nn.Parameter(torch.empty(self.rank, base.in_features, device=device, dtype=dtype))
                for _ in self.out_slices
            ]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(b - a, self.rank, device=device, dtype=dtype)) for a, b in self.out_slices]
        )
        for a in self.lora_A:
            # The LoRA reference implementation's init (nn.Linear's default): Kaiming-uniform A,
            # zero B, so the wrapped layer starts as the base layer exactly.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    # Attributes code that reads a Linear's shape expects (timm reads in/out_features in places).
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update (out, in) that LoRA adds to the base weight: ``scale · B @ A`` on each slice, 0 elsewhere."""
        delta = torch.zeros_like(self.base.weight)
        for (start, stop), a, b in zip(self.out_slices, self.lora_A, self.lora_B):
            delta[start:stop] = self.scale * (b @ a)
        return delta

    def effective_weight(self) -> torch.Tensor:
        """Base weight + LoRA update (out, in): the weight of the equivalent plain Linear."""
        return self.base.weight + self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out_features)
        x_in = self.dropout(x)
        # Rebuild the output from pieces (adapted slices + untouched gaps) instead of writing into
        # it in place, so autograd never sees a modified saved tensor.
        pieces, cursor = [], 0
        for (start, stop), a, b in zip(self.out_slices, self.lora_A, self.lora_B):
            if start > cursor:
                pieces.append(out[..., cursor:start])
            update = (x_in @ a.t()) @ b.t()  # (..., rank) → (..., stop - start)
            pieces.append(out[..., start:stop] + self.scale * update)
            cursor = stop
        if cursor < out.shape[-1]:
            pieces.append(out[..., cursor:])
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (weights folded, no LoRA parameters)."""
        base = self.base
        linear = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.effective_weight())
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        linear.weight.requires_grad_(base.weight.requires_grad)
        if base.bias is not None:
            linear.bias.requires_grad_(base.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, out_slices={list(self.out_slices)}"


def _check_slices(slices: Sequence[tuple[int, int]], out_features: int) -> None:
    ordered = sorted(slices)
    for i, (start, stop) in enumerate(ordered):
        if not 0 <= start < stop <= out_features:
            raise InputError(None, "lora.out_slices", f"ranges 0 <= start < stop <= {out_features}", (start, stop))
        if i and start < ordered[i - 1][1]:
            raise InputError(None, "lora.out_slices", "non-overlapping ranges", ordered)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def _targets(targets: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(str(t) for t in targets))
    if not chosen or any(t not in PROJECTIONS for t in chosen):
        raise InputError(None, "lora.targets", f"a non-empty subset of {PROJECTIONS}", list(targets))
    return chosen


def _attention_linears(
    model: nn.Module, targets: tuple[str, ...]
) -> list[tuple[str, nn.Linear, list[tuple[int, int]]]]:
    """``(name, linear, out_slices)`` for each attention projection holding one of ``targets``.

    Only Linears inside a module whose name ends in ``attn``/``attention``/``self_attn`` count,
    so an MLP layer that happens to be called ``q`` is never touched.
    """
    found = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        parent_name = name.rpartition(".")[0]
        parent_leaf = parent_name.rpartition(".")[2].lower()
        if leaf not in _LAYOUTS or not isinstance(module, nn.Linear):
            continue
        if not (parent_leaf.endswith("attn") or parent_leaf.endswith("attention")):
            continue
        layout = _LAYOUTS[leaf]
        if module.out_features % len(layout):
            continue
        width = module.out_features // len(layout)
        slices = [(i * width, (i + 1) * width) for i, proj in enumerate(layout) if proj in targets]
        if slices:
            found.append((name, module, slices))
    return found


def apply_lora(
    model: nn.Module, rank: int = 8, alpha: float = 1.0, targets: Sequence[str] = ("q", "v"), dropout: float = 0.0
) -> list[str]:
    """Wrap a timm ViT's attention projections with LoRA (in place); freeze everything else.

    Fused ``qkv`` Linears get one adapter per targeted third (q and v by default; k untouched);
    separate ``q_proj``/``v_proj`` (or ``q``/``v``) Linears are wrapped whole. Every parameter of
    ``model`` except the new A/B matrices ends with ``requires_grad=False``. Returns the names of
    the wrapped modules; raises InputError when the model has no such projection, or already
    carries LoRA.
    """
    targets = _targets(targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise InputError(
            None, "model", "a model without LoRA adapters (apply_lora was already called)", "LoRALinear modules"
        )
    found = _attention_linears(model, targets)
    if not found:
        raise InputError(
            None,
            "model",
            "a timm ViT with attention projections (attn.qkv, attn.q/v or q_proj/v_proj Linears) to adapt",
            type(model).__name__,
        )
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, linear, slices in found:
        parent = _parent(model, name)
        # timm's EVA attention keeps q/v biases apart and, unless told otherwise, calls
        # F.linear(x, self.qkv.weight, ...) directly, which would bypass the wrapper; adding the
        # (unchanged) biases after the module call computes the same thing and keeps LoRA in the path.
        if (
            name.endswith("qkv")
            and getattr(parent, "q_bias", None) is not None
            and hasattr(parent, "qkv_bias_separate")
        ):
            parent.qkv_bias_separate = True
        _set_module(model, name, LoRALinear(linear, rank=rank, alpha=alpha, out_slices=slices, dropout=dropout))
        names.append(name)
    return names


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B matrices of every LoRA wrapper in ``model`` (what the optimiser should train)."""
    params = []
    for _, module in lora_modules(model):
        params.extend(module.lora_A)
        params.extend(module.lora_B)
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under their names in ``model.state_dict()`` (small, for checkpoints)."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))
    }


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` in ``model`` by the equivalent plain ``nn.Linear`` (in place).

    The merged weight is ``W + scale · B @ A`` on the adapted slices, so the model computes the
    same outputs with stock timm modules (exportable with ``load_state_dict(strict=True)`` into a
    fresh ``timm.create_model``). Returns ``model``. A bare :class:`LoRALinear` returns its merge.
    """
    if isinstance(model, LoRALinear):
        return model.merged()
    for name, module in lora_modules(model):
        _set_module(model, name, module.merged())
    return model

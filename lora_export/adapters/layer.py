"""The export-friendly LoRA layer: `base(x) + s·B(A(x))` around `nn.Linear`, GPT-2 `Conv1D` or `nn.Conv2d`.

One wrapper, three sources for A and B:
- a resident `ModuleLora` (the PyTorch reference, PEFT's unmerged semantics);
- a `BranchFeed` filled by the export wrapper, so A and B become graph inputs (branched export);
- the same feed in bank mode, where per-row adapters are selected by a rank-slot mask.
Merging folds `s·B·A` into the base weight in float32 and refuses non-finite results (as PEFT does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_export.adapters.adapter import ModuleLora
from lora_export.contract import INPUTS, bank_names, weight_names
from lora_export.errors import AdapterError


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: `x @ W + b` with `W` `[in, out]` (PEFT's fan_in_fan_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def supported_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) or is_conv1d(module)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    raise TypeError(f"unsupported layer type {type(module).__name__}")


class BranchFeed:
    """LoRA tensors for the current forward, filled by the export wrapper (graph inputs when traced).

    inputs layout: `tensors` holds `weight_names(P)`: A `[in, r]`, B `[r, out]` (s folded).
    bank layout:   `tensors` holds `bank_names(P)`: A `[N, in, R]`, B `[N, R, out]`, and
                   `slot_mask` `[batch, N*R]` (1 where the slot belongs to the row's adapter).
    """

    def __init__(self, layout: str = INPUTS):
        self.layout = layout
        self.tensors: dict[str, torch.Tensor] = {}
        self.slot_mask: torch.Tensor | None = None

    def branch(self, path: str, x: torch.Tensor) -> torch.Tensor:
        if self.layout == INPUTS:
            a_name, b_name = weight_names(path)
            return (x @ self.tensors[a_name]) @ self.tensors[b_name]  # (B, T, r) -> (B, T, out)
        a_name, b_name = bank_names(path)
        a_bank, b_bank = self.tensors[a_name], self.tensors[b_name]  # (N, in, R), (N, R, out)
        n, d_in, rank = a_bank.shape
        a_cat = a_bank.permute(1, 0, 2).reshape(d_in, n * rank)  # (in, N*R)
        b_cat = b_bank.reshape(n * rank, b_bank.shape[-1])  # (N*R, out)
        h = x @ a_cat  # (B, T, N*R)
        mask = self.slot_mask.reshape(self.slot_mask.shape[0], *([1] * (h.dim() - 2)), -1)
        return (h * mask) @ b_cat  # other adapters' rank slots zeroed per row


class LoraLayer(nn.Module):
    """Wraps a Linear / Conv1D / Conv2d; `base_layer` keeps the original weights."""

    def __init__(self, base_layer: nn.Module, path: str):
        super().__init__()
        if not supported_layer(base_layer):
            raise TypeError(f"{path}: LoRA supports nn.Linear, Conv1D and nn.Conv2d, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.path = path
        self.lora: ModuleLora | None = None
        self.feed: BranchFeed | None = None
        self.enabled = True

    def set_lora(self, lora: ModuleLora | None) -> None:
        """Make `lora` the resident adapter (device and dtype of the base weight)."""
        if lora is not None:
            w = self.base_layer.weight
            lora = ModuleLora(A=lora.A.to(w.device), B=lora.B.to(w.device), scaling=lora.scaling)
        self.lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        if self.feed is not None:
            return y + self.feed.branch(self.path, x.to(y.dtype)).to(y.dtype)
        if self.lora is None:
            return y
        return y + self._resident_branch(x)

    def _resident_branch(self, x: torch.Tensor) -> torch.Tensor:
        lora, base = self.lora, self.base_layer
        a, b = lora.A.to(x.dtype), lora.B.to(x.dtype)
        if isinstance(base, nn.Conv2d):
            h = F.conv2d(x, a, stride=base.stride, padding=base.padding, dilation=base.dilation)
            return F.conv2d(h, b) * lora.scaling
        return F.linear(F.linear(x, a), b) * lora.scaling  # PEFT: lora_B(lora_A(x)) * scaling


def merged_weight(base: nn.Module, lora: ModuleLora, *, allow_nonfinite: bool = False, path: str = "") -> torch.Tensor:
    """`W0 + s·B·A` computed in float32, cast back to the base dtype; refuses non-finite results."""
    w0 = base.weight.detach()
    return merged_tensor(w0, lora, in_out=is_conv1d(base), allow_nonfinite=allow_nonfinite, path=path)


def merged_tensor(
    w0: torch.Tensor, lora: ModuleLora, *, in_out: bool = False, allow_nonfinite: bool = False, path: str = ""
) -> torch.Tensor:
    """`merged_weight` on a weight tensor (`in_out`: stored `[in, out]`, as GPT-2's Conv1D)."""
    merged = lora.merged_with(w0, in_out=in_out, where=path)
    if not allow_nonfinite and not torch.isfinite(merged).all():
        raise AdapterError(
            f"{path}: merging gives NaN/Inf in {w0.dtype} (values too large); "
            "use --dtype fp32 or pass --allow-nonfinite"
        )
    return merged

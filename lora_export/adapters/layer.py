"""The export-friendly LoRA layer: `base(x) + s·B(A(x))` around `nn.Linear`, GPT-2 `Conv1D`, `nn.Conv2d` or
`nn.Embedding` (A's rows gathered by token id, then B), and DoRA's `g * (W0·x + s·B·A·x) + bias`.

One wrapper, three sources for A and B (and DoRA's g):
- a resident `ModuleLora` (the PyTorch reference, PEFT's unmerged semantics);
- a `BranchFeed` filled by the export wrapper, so A and B become graph inputs (branched export);
- the same feed in bank mode, where per-row adapters are selected by a rank-slot mask.
Merging folds `s·B·A` into the base weight in float32 and refuses non-finite results (as PEFT does).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from lora_export.adapters.adapter import ModuleLora
from lora_export.contract import (
    BANK_FORMULATIONS,
    BANK_KIND,
    DENSE,
    GATHER,
    INPUTS,
    bank_names,
    dora_name,
    weight_names,
)
from lora_export.errors import AdapterError


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: `x @ W + b` with `W` `[in, out]` (PEFT's fan_in_fan_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def supported_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or is_conv1d(module)


def stores_in_out(module: nn.Module) -> bool:
    """Whether the layer's weight is stored `[in, out]` (Conv1D; nn.Embedding `[num_embeddings, dim]`)."""
    return is_conv1d(module) or isinstance(module, nn.Embedding)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported layer (an embedding: (num_embeddings, embedding_dim))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    raise TypeError(f"unsupported layer type {type(module).__name__}")


def _dora(y: torch.Tensor, branch: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """DoRA: `g * (W0·x + s·B·A·x) + bias` from `y = W0·x + bias`; g broadcasts over y's channels."""
    if bias is None:
        return g * (y + branch)
    return g * (y - bias + branch) + bias


class BranchFeed:
    """LoRA tensors for the current forward, filled by the export wrapper (graph inputs when traced).

    inputs layout: `tensors` holds `weight_names(P)`: A `[in, r]`, B `[r, out]` (s folded), and `dora_name(P)`
                   `[out]` for DoRA slots.
    bank layout:   `tensors` holds `bank_names(P)`: A `[N, in, R]`, B `[N, R, out]`, `dora_name(P, "bank")`
                   `[N, out]` for DoRA slots; `slot_mask` `[batch, N*R]` (1 where the slot belongs to the row's
                   adapter) and `index` `[batch]` (the row's adapter, -1 = none).
    `formulation` (bank): `dense` (the masked concatenation) or `gather` (each row's own A and B, batched
    matmul; embedding slots stay dense).
    """

    def __init__(self, layout: str = INPUTS, formulation: str = DENSE):
        if formulation not in BANK_FORMULATIONS:
            raise ValueError(f"unknown bank formulation {formulation!r}")
        self.layout = layout
        self.formulation = formulation
        self.tensors: dict[str, torch.Tensor] = {}
        self.slot_mask: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

    def branch(self, path: str, x: torch.Tensor, embedding: bool = False) -> torch.Tensor:
        lookup = F.embedding if embedding else torch.matmul  # embedding: x holds token ids
        if self.layout == INPUTS:
            a_name, b_name = weight_names(path)
            return lookup(x, self.tensors[a_name]) @ self.tensors[b_name]  # (B, T, r) -> (B, T, out)
        a_name, b_name = bank_names(path)
        a_bank, b_bank = self.tensors[a_name], self.tensors[b_name]  # (N, in, R), (N, R, out)
        if self.formulation == GATHER and not embedding:
            return self._gathered(x, a_bank, b_bank)
        n, d_in, rank = a_bank.shape
        a_cat = a_bank.permute(1, 0, 2).reshape(d_in, n * rank)  # (in, N*R)
        b_cat = b_bank.reshape(n * rank, b_bank.shape[-1])  # (N*R, out)
        h = lookup(x, a_cat)  # (B, T, N*R)
        mask = self.slot_mask.reshape(self.slot_mask.shape[0], *([1] * (h.dim() - 2)), -1)
        return (h * mask) @ b_cat  # other adapters' rank slots zeroed per row

    def _gathered(self, x: torch.Tensor, a_bank: torch.Tensor, b_bank: torch.Tensor) -> torch.Tensor:
        """Each row's own A `[in, R]` and B `[R, out]`, gathered by index; a zero adapter in front serves -1 (and
        an empty bank), so the cost per row does not depend on how many adapters the bank holds."""
        index = self.index + 1
        a_rows = torch.cat([torch.zeros_like(a_bank[:1]), a_bank]).index_select(0, index)  # (B, in, R)
        b_rows = torch.cat([torch.zeros_like(b_bank[:1]), b_bank]).index_select(0, index)  # (B, R, out)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, L, in)
        return (rows @ a_rows @ b_rows).reshape(*x.shape[:-1], b_bank.shape[-1])

    def dora_scale(self, path: str, like: torch.Tensor) -> torch.Tensor | None:
        """DoRA's g for this forward, shaped to broadcast over `like` (B, ..., out); None for a slot without."""
        if self.layout == INPUTS:
            return self.tensors.get(dora_name(path))
        g_bank = self.tensors.get(dora_name(path, BANK_KIND))  # (N, out)
        if g_bank is None:
            return None
        rows = self.row_onehot(g_bank.shape[0], g_bank.dtype)  # (B, N)
        g = 1 + rows @ (g_bank - 1)  # (B, out): ones for rows without an adapter or with a plain LoRA one
        return g.reshape(g.shape[0], *([1] * (like.dim() - 2)), g.shape[-1])

    def row_onehot(self, n, dtype: torch.dtype) -> torch.Tensor:
        """`[batch, N]`: 1 at each row's adapter; all zeros for -1 (no adapter)."""
        return (torch.arange(n, device=self.index.device).unsqueeze(0) == self.index.unsqueeze(1)).to(dtype)


class LoraLayer(nn.Module):
    """Wraps a Linear / Conv1D / Conv2d / Embedding; `base_layer` keeps the original weights."""

    def __init__(self, base_layer: nn.Module, path: str):
        super().__init__()
        if not supported_layer(base_layer):
            raise TypeError(
                f"{path}: LoRA supports nn.Linear, Conv1D, nn.Conv2d and nn.Embedding, not {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.path = path
        self.lora: ModuleLora | None = None
        self.dora_g: torch.Tensor | None = None  # the resident adapter's DoRA factor, computed once
        self.feed: BranchFeed | None = None
        self.enabled = True

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.base_layer, nn.Embedding)

    def set_lora(self, lora: ModuleLora | None) -> None:
        """Make `lora` the resident adapter (device of the base weight); DoRA's g is computed here, once."""
        self.dora_g = None
        if lora is not None:
            w = self.base_layer.weight
            lora = dataclasses.replace(lora, A=lora.A.to(w.device), B=lora.B.to(w.device))
            if lora.is_dora:
                w0 = w.detach().T if stores_in_out(self.base_layer) else w.detach()
                self.dora_g = lora.dora_factor(w0)
        self.lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        if self.feed is not None:
            x_in = x if self.is_embedding else x.to(y.dtype)
            branch = self.feed.branch(self.path, x_in, self.is_embedding).to(y.dtype)
            g = self.feed.dora_scale(self.path, y)
            return y + branch if g is None else _dora(y, branch, g.to(y.dtype), self._bias(y))
        if self.lora is None:
            return y
        branch = self._resident_branch(x, y.dtype)
        if self.dora_g is None:
            return y + branch
        g = self.dora_g.to(y.dtype)
        if isinstance(self.base_layer, nn.Conv2d):
            g = g.view(1, -1, *([1] * (y.dim() - 2)))
        return _dora(y, branch, g, self._bias(y))

    def _bias(self, y: torch.Tensor) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return None
        if isinstance(self.base_layer, nn.Conv2d):
            return bias.to(y.dtype).view(1, -1, *([1] * (y.dim() - 2)))
        return bias.to(y.dtype)

    def _resident_branch(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lora, base = self.lora, self.base_layer
        a, b = lora.A.to(dtype), lora.B.to(dtype)
        if isinstance(base, nn.Conv2d):
            h = F.conv2d(x, a, stride=base.stride, padding=base.padding, dilation=base.dilation)
            return F.conv2d(h, b) * lora.scaling
        if isinstance(base, nn.Embedding):
            return F.embedding(x, a.T) @ b.T * lora.scaling  # PEFT: embedding(x, A.T) @ B.T * scaling
        return F.linear(F.linear(x, a), b) * lora.scaling  # PEFT: lora_B(lora_A(x)) * scaling


def merged_weight(base: nn.Module, lora: ModuleLora, *, allow_nonfinite: bool = False, path: str = "") -> torch.Tensor:
    """`W0 + s·B·A` computed in float32, cast back to the base dtype; refuses non-finite results."""
    w0 = base.weight.detach()
    return merged_tensor(w0, lora, in_out=stores_in_out(base), allow_nonfinite=allow_nonfinite, path=path)


def merged_tensor(
    w0: torch.Tensor, lora: ModuleLora, *, in_out: bool = False, allow_nonfinite: bool = False, path: str = ""
) -> torch.Tensor:
    """`merged_weight` on a weight tensor (`in_out`: stored `[in, out]`, as GPT-2's Conv1D and nn.Embedding)."""
    merged = lora.merged_with(w0, in_out=in_out, where=path)
    if not allow_nonfinite and not torch.isfinite(merged).all():
        raise AdapterError(
            f"{path}: merging gives NaN/Inf in {w0.dtype} (values too large); "
            "use --dtype fp32 or pass --allow-nonfinite"
        )
    return merged


def wrap_paths(model: nn.Module, paths, wrapper) -> dict[str, nn.Module]:
    """Replace each module at `paths` by `wrapper(module, path)` unless it already is one (idempotent);
    returns the wrappers by path."""
    out = {}
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, wrapper):
            module = wrapper(module, path)
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
        out[path] = module
    return out

"""Models without their weights: meta-device skeletons, and module trees that share another model's tensors.

A skeleton has the real module tree with its parameters on the meta device: the tracer needs shapes, not
values, so an export never holds the weights; they are streamed into the graph file afterwards
(`lora_export.export.stream`). A shared copy is a new module tree over the same parameter and
buffer tensors, for a caller that wraps modules (LoRA layers) without touching the original model or
copying its weights.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator

import torch
from torch import nn

_lock = threading.Lock()


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, nothing initialized) and
    keep their buffers (rotary frequencies, position ids) real, as computed by their constructors."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = meta_parameter(param)

    with _lock:
        nn.Module.register_parameter = on_meta
        try:
            yield
        finally:
            nn.Module.register_parameter = register


def meta_parameter(like: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Parameter:
    """A parameter with `like`'s shape (and `dtype` or `like`'s dtype) on the meta device."""
    return nn.Parameter(
        torch.empty(like.shape, dtype=dtype or like.dtype, device="meta"),
        requires_grad=bool(getattr(like, "requires_grad", False)),
    )


def shared_module(module: nn.Module) -> nn.Module:
    """A new module tree over the same parameter and buffer tensors (no weight is copied)."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def meta_module(module: nn.Module, dtype: torch.dtype | None = None) -> tuple[nn.Module, dict[int, torch.Tensor]]:
    """A new module tree with a fresh meta-device tensor for every parameter and buffer of `module` (floating
    ones in `dtype` when given, as `module.to(dtype)` would; ties kept: a tensor shared by two modules maps to
    one meta tensor). Returns the tree and `{id(meta tensor): original tensor}`."""
    origin: dict[int, torch.Tensor] = {}
    memo: dict[int, torch.Tensor] = {}

    def cast(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    for p in module.parameters():
        memo[id(p)] = meta_parameter(p, cast(p))
        origin[id(memo[id(p)])] = p
    for b in module.buffers():
        if id(b) not in memo:
            memo[id(b)] = torch.empty(b.shape, dtype=cast(b), device="meta")
            origin[id(memo[id(b)])] = b
    return copy.deepcopy(module, memo), origin


def tensor_names(module: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter and buffer (`{id: [names]}`; tied ones have several), in module order."""
    names: dict[int, list[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    return names

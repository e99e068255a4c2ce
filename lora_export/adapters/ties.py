"""Weights shared between modules (tied): GPT-2's `lm_head` and `transformer.wte`, Llama's `lm_head` and
`model.embed_tokens` under `tie_word_embeddings`, or any parameter two modules hold.

A LoRA adapter on one user of a tied weight changes that user only: in PEFT's forward the other user (the
input embeddings) still reads `W0`. So whatever writes a merged weight must give the adapted module a tensor
of its own and leave the shared one as it is:

- `own_weight` is how a merge writes `W0 + s·B·A` into a module (merge-and-export): a new parameter, so a
  tie is broken rather than the merged value leaking into the other user;
- `untie` gives modules that get a LoRA slot their own copy of a shared base weight before a branched export,
  so the graph holds one initializer per user (`lm_head.weight` and `transformer.wte.weight`), `optimize
  --bake` folds into a tensor nothing else reads, and its result is the merged export's, name for name;
- `other_readers` is the graph-side rule (the bake pass, the TensorRT refit plan): a weight initializer that
  a node outside the module's own matmul also reads (an embedding `Gather`) must not be overwritten.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# ONNX ops (and the input position of the weight) through which a Linear/Conv1D/Conv2d reads its weight.
WEIGHT_READERS = {("Transpose", 0), ("MatMul", 1), ("Gemm", 1), ("Conv", 1), ("ConvTranspose", 1)}


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names that share one tensor, one list per shared tensor (model order)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def is_shared(model: nn.Module, param: torch.Tensor) -> bool:
    return sum(p is param for _, p in model.named_parameters(remove_duplicate=False)) > 1


def own_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Give `module` the weight `value` as a new parameter of its own (a tie with another module is broken)."""
    module.weight = nn.Parameter(value.detach(), requires_grad=False)


def untie(model: nn.Module, modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Each given (path, module) whose weight another module shares gets its own copy; returns the paths."""
    untied = []
    for path, module in modules:
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and is_shared(model, weight):
            own_weight(module, weight.detach().clone())
            untied.append(path)
    return untied


def other_readers(readers: Iterable[tuple[str, int]]) -> list[str]:
    """The readers of a weight initializer, as (op type, input position), that are not a layer's matmul of
    that weight (an embedding `Gather`, ...): non-empty means the weight is tied with another use."""
    return sorted({f"{op}" for op, k in readers if (op, k) not in WEIGHT_READERS})

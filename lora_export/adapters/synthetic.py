"""Random PEFT-format adapters with non-zero B (PEFT initializes B to zero, which would prove nothing)."""

from __future__ import annotations

import torch
from torch import nn

from lora_export.adapters.adapter import Adapter, ModuleLora
from lora_export.adapters.inject import find_targets, unwrap
from lora_export.adapters.layer import layer_dims
from lora_export.adapters.spec import LoraSpec


def random_adapter(
    model: nn.Module, spec: LoraSpec, *, seed: int = 0, b_std: float = 0.05, name: str = "random"
) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    layers = unwrap(model)
    for path in sorted(find_targets(model, spec)):
        layer = layers[path]
        d_in, d_out = layer_dims(layer)
        r = spec.rank_for(path)
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            a = torch.randn(r, d_in, kh, kw, generator=g) / (d_in * kh * kw) ** 0.5
            b = torch.randn(d_out, r, 1, 1, generator=g) * b_std
        elif isinstance(layer, nn.Embedding):  # A's columns are looked up by token id: unit scale, as PEFT's B
            a = torch.randn(r, d_in, generator=g)  # lora_embedding_A [r, num_embeddings]
            b = torch.randn(d_out, r, generator=g) * b_std  # lora_embedding_B [dim, r]
        else:
            a = torch.randn(r, d_in, generator=g) / d_in**0.5  # PEFT layout [r, in]
            b = torch.randn(d_out, r, generator=g) * b_std  # [out, r], non-zero
        embedding = isinstance(layer, nn.Embedding)
        modules[path] = ModuleLora(A=a, B=b, scaling=spec.scaling_for(path, r), embedding=embedding)
    return Adapter(spec=spec, modules=modules, name=name, source=f"random(seed={seed})")


def random_model_adapter(loaded, *, r=8, alpha=16.0, targets=None, seed=0, use_rslora=False, name=None, **spec_kw):
    """A seeded random adapter (non-zero B) for a loaded model: `targets` default to its architecture's."""
    from lora_export.adapters.spec import DEFAULT_TARGETS, LoraSpec

    spec = LoraSpec(
        r=r, alpha=alpha, use_rslora=use_rslora, target_modules=targets or DEFAULT_TARGETS[loaded.arch], **spec_kw
    )
    return random_adapter(loaded.module, spec, seed=seed, name=name or f"r{r}_s{seed}")

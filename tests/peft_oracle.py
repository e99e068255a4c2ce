"""PEFT as the oracle: build PEFT LoRA models with non-zero B and save them as adapter directories."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch


def fill_lora(peft_model, seed: int, adapter_name: str | None = None, b_std: float = 0.05) -> None:
    """PEFT starts B at zero (a test with B = 0 proves nothing): give A and B seeded random values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if adapter_name is not None and f".{adapter_name}." not in f"{name}.":
            continue
        if "lora_B" in name or "lora_embedding_B" in name:
            p.data = torch.randn(p.shape, generator=g) * b_std
        elif "lora_A" in name or "lora_embedding_A" in name:
            p.data = torch.randn(p.shape, generator=g) / (p.shape[1] ** 0.5 if "embedding" not in name else 1.0)


def build_peft(loaded, seed: int = 0, adapter_name: str = "default", **config):
    """A PEFT model over a private copy of `loaded.module` with one filled adapter."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(loaded.module)
    cfg = LoraConfig(init_lora_weights=True, lora_dropout=0.0, **config)
    pm = get_peft_model(base, cfg, adapter_name=adapter_name)
    fill_lora(pm, seed, adapter_name)
    return pm.eval()


def move_dora_magnitudes(pm, name: str, seed: int) -> None:
    """PEFT starts DoRA's magnitude m at ||W0|| (scale 1 before training): move it, as training does."""
    g = torch.Generator().manual_seed(seed)
    for n, p in pm.named_parameters():
        if f"lora_magnitude_vector.{name}" in n:
            p.data = p.data * (1 + 0.3 * torch.randn(p.shape, generator=g))


def add_peft_adapter(pm, name: str, seed: int, **config) -> None:
    from peft import LoraConfig

    pm.add_adapter(name, LoraConfig(init_lora_weights=True, lora_dropout=0.0, **config))
    fill_lora(pm, seed, name)
    pm.eval()


def save_adapter(pm, out_dir: Path, adapter_name: str = "default") -> Path:
    """Save one adapter as a PEFT directory; returns the directory holding adapter_config.json."""
    pm.save_pretrained(str(out_dir), selected_adapters=[adapter_name])
    return out_dir if adapter_name == "default" else out_dir / adapter_name


def peft_forward(pm, loaded, feeds: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if loaded.arch == "convnet":
            return {"logits": pm(tensors["pixel_values"]).numpy()}
        out = pm(**tensors, use_cache=False, return_dict=True, **kwargs)
    return {n: out[n].detach().numpy() for n in loaded.output_names}


def peft_with(pm, loaded, feeds: dict[str, np.ndarray], adapter: str | None) -> dict[str, np.ndarray]:
    """`peft_forward` with PEFT adapter `adapter` active (None: adapters disabled = the base model)."""
    if adapter is None:
        with pm.disable_adapter():
            return peft_forward(pm, loaded, feeds)
    pm.set_adapter(adapter)
    return peft_forward(pm, loaded, feeds)


def max_err(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)

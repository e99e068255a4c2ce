"""PyTorch runner: the reference (the model with the LoRA branch resident, PEFT's unmerged semantics)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.inject import attach_adapter
from lora_export.backends import Feeds
from lora_export.models.loading import LoadedModel, call_model


class TorchRunner:
    name = "torch"

    def __init__(
        self,
        loaded: LoadedModel,
        adapter: Adapter | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.loaded, self.adapter, self.device, self.dtype = loaded, adapter, device, dtype
        self.model: LoadedModel | None = None

    def __enter__(self) -> TorchRunner:
        model = copy.copy(self.loaded)
        model.module = copy.deepcopy(self.loaded.module).to(self.device, self.dtype).eval()
        if self.adapter is not None:
            attach_adapter(model.module, self.adapter)
        self.model = model
        return self

    def __exit__(self, *exc) -> None:
        self.model = None

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        tensors = {}
        for name in self.model.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
            tensors[name] = t.to(self.dtype) if t.is_floating_point() else t
        with torch.no_grad():
            outs = call_model(self.model, tensors)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.model.output_names, outs)}

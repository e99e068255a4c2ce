"""PyTorch runner: the reference (the model with the LoRA branch resident, PEFT's unmerged semantics)."""

from __future__ import annotations

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
        model = self.loaded.copy(device=self.device, dtype=self.dtype)
        model.module.eval()
        if self.adapter is not None:
            attach_adapter(model.module, self.adapter)
        self.model = model
        return self

    def __exit__(self, *exc) -> None:
        self.model = None

    def _tensors(self, feeds: Feeds) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in self.model.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
            tensors[name] = t.to(self.dtype) if t.is_floating_point() else t
        return tensors

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        tensors = self._tensors(feeds)
        with torch.no_grad():
            outs = call_model(self.model, tensors)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.model.output_names, outs)}

    # -- latency harness (lora_export.verify.latency): inputs prepared outside the timed region ---------------
    def prepare(self, feeds: Feeds) -> dict[str, torch.Tensor]:
        """Input tensors already on the device and in the runner's dtype."""
        return self._tensors(feeds)

    def run_prepared(self, handle: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode():
            call_model(self.model, handle)

    def synchronize(self) -> None:
        """Wait for queued CUDA kernels (the timed region must end with the work done)."""
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize(self.device)

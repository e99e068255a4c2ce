"""PyTorch runner: the reference (the model with the LoRA branch resident, PEFT's unmerged semantics).

One model serves every adapter: the runner wraps the adapted modules of all its adapters once and swaps
which adapter is resident (`use`), as PEFT's set_adapter does. On the model's own device and dtype it runs a
new module tree over the caller's weight tensors (no copy, the caller's model untouched); a lazily loaded
model is loaded on entry and released on exit.
"""

from __future__ import annotations

import numpy as np
import torch

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.inject import check_fits, lora_layers, wrap_modules
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
        adapters: list[Adapter] = (),
    ):
        """`adapter` is resident from the start; `adapters` (more of them) can be made resident with `use`."""
        self.loaded, self.adapter, self.device, self.dtype = loaded, adapter, device, dtype
        self.adapters = [a for a in [adapter, *adapters] if a is not None]
        self.model: LoadedModel | None = None

    def __enter__(self) -> TorchRunner:
        self.model = self.loaded.owned(device=self.device, dtype=self.dtype)  # the caller's model stays as it is
        self.model.module.eval()
        for a in self.adapters:
            check_fits(self.model.module, a)
        wrap_modules(self.model.module, sorted({p for a in self.adapters for p in a.modules}))
        self.use(self.adapter)
        return self

    def __exit__(self, *exc) -> None:
        self.model = None

    def use(self, adapter: Adapter | None) -> None:
        """Make `adapter` (one given to the runner) resident; None runs the base model."""
        for path, layer in lora_layers(self.model.module).items():
            layer.set_lora(adapter.modules.get(path) if adapter is not None else None)

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

    # -- latency harness (lora_export.bench.latency): inputs prepared outside the timed region ---------------
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

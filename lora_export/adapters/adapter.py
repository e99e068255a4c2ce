"""An adapter in memory: per-module A and B in PEFT's layout plus the scaling of each module.

PEFT layout: `A` is `[r, in]` (`[r, in, kh, kw]` for Conv2d), `B` is `[out, r]` (`[out, r, 1, 1]`).
The ONNX name contract (`lora_export.contract`) uses `[in, r]` and `[r, out]` with the scaling folded into B;
`contract_tensors` converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lora_export.adapters.spec import LoraSpec
from lora_export.contract import weight_names
from lora_export.errors import AdapterError


@dataclass
class ModuleLora:
    """One adapted module: A, B (PEFT layout, float32) and its scaling `s`."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def r(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.A.dim() == 4

    def delta_weight(self) -> torch.Tensor:
        """`s·B·A` in float32, shaped like an `nn.Linear` weight `[out, in]` (or a conv kernel)."""
        a, b = self.A.float(), self.B.float()
        if self.is_conv:
            # B is 1x1: contract its r channels with A's output channels.
            return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scaling
        return (b @ a) * self.scaling

    def merged_with(self, w0: torch.Tensor, *, in_out: bool = False, where: str = "") -> torch.Tensor:
        """`W0 + s·B·A` added in float32, cast back to W0's dtype; `in_out` for weights stored `[in, out]`
        (GPT-2 Conv1D). The one merge every path uses (merge-and-export, bake, TensorRT refit), so they agree
        bit for bit; callers check finiteness with their own advice."""
        delta = self.delta_weight().to(w0.device)
        if in_out:
            delta = delta.T
        if delta.shape != w0.shape:
            raise AdapterError(f"{where}: adapter delta {tuple(delta.shape)} does not fit weight {tuple(w0.shape)}")
        return (w0.float() + delta).to(w0.dtype)

    def contract_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(`[in, r]`, `[r, out]` with the scaling folded in), float32."""
        if self.is_conv:
            raise ValueError("Conv2d adapters have no branched (contract) form; use merged export")
        a = self.A.float().T.contiguous().numpy()
        b = (self.B.float() * self.scaling).T.contiguous().numpy()
        return a, b


@dataclass
class Adapter:
    """A whole adapter: its spec, the adapted modules (paths without `base_model.model.`), provenance."""

    spec: LoraSpec
    modules: dict[str, ModuleLora]
    name: str = "adapter"
    source: str = ""
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def contract_tensors(self) -> dict[str, np.ndarray]:
        """All tensors by graph input name, per the LoRA tensor name contract."""
        out: dict[str, np.ndarray] = {}
        for path, mod in sorted(self.modules.items()):
            a_name, b_name = weight_names(path)
            out[a_name], out[b_name] = mod.contract_pair()
        return out

    def ranks(self) -> dict[str, int]:
        return {p: m.r for p, m in self.modules.items()}

    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "modules": len(self.modules),
            "ranks": sorted(set(self.ranks().values())),
            "parameters": self.num_parameters(),
            "spec": self.spec.to_dict(),
        }

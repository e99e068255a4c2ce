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
from lora_export.contract import IN_OUT, dora_name, saved_name, weight_names
from lora_export.errors import AdapterError


@dataclass
class ModuleLora:
    """One adapted module: A, B (PEFT layout, float32), its scaling `s`, and what else its kind needs.

    - `embedding`: LoRA on an `nn.Embedding` (PEFT's `lora_embedding_A` `[r, num_embeddings]` and
      `lora_embedding_B` `[dim, r]`): the input is token ids, A's columns are gathered, then B applied.
    - DoRA (`use_dora`): `magnitude` is PEFT's `lora_magnitude_vector` m `[out]`; the layer computes
      `g * (W0·x + s·B·A·x) + bias` with `g = m / ||W0 + s·B·A||` (L2 norm of each output channel's row of the
      `[out, in]` weight). `scale` holds g itself when it was computed already (a contract-layout file).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    embedding: bool = False
    magnitude: torch.Tensor | None = None
    scale: torch.Tensor | None = None

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

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None or self.scale is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of this module by role (for finiteness checks)."""
        out = {"lora_A": self.A, "lora_B": self.B}
        if self.magnitude is not None:
            out["lora_magnitude_vector"] = self.magnitude
        if self.scale is not None:
            out["dora_scale"] = self.scale
        return out

    def delta_weight(self) -> torch.Tensor:
        """`s·B·A` in float32, shaped like an `nn.Linear` weight `[out, in]` (or a conv kernel)."""
        a, b = self.A.float(), self.B.float()
        if self.is_conv:
            # B is 1x1: contract its r channels with A's output channels.
            return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scaling
        return (b @ a) * self.scaling

    def dora_factor(self, w0: torch.Tensor) -> torch.Tensor:
        """DoRA's `g = m / ||W0 + s·B·A||` `[out]` in float32, `w0` in the `[out, in]` (or conv) layout."""
        if self.scale is not None:
            return self.scale.float().to(w0.device)
        if self.magnitude is None:
            raise ValueError("not a DoRA module")
        weight = w0.float() + self.delta_weight().to(w0.device)
        return self.magnitude.float().to(w0.device) / weight.flatten(1).norm(p=2, dim=1)

    def dora_scale(self, base_weight, layout: str) -> np.ndarray:
        """`g` for a graph whose base weight is `base_weight` (numpy or torch) stored in `layout`."""
        w = torch.from_numpy(np.array(base_weight, dtype=np.float32))
        return self.dora_factor(w.T if layout == IN_OUT else w).numpy()

    def merged_with(self, w0: torch.Tensor, *, in_out: bool = False, where: str = "") -> torch.Tensor:
        """`W0 + s·B·A` (DoRA: `g * (W0 + s·B·A)`, g per output channel) computed in float32, cast back to W0's
        dtype; `in_out` for weights stored `[in, out]` (GPT-2 Conv1D, nn.Embedding). The one merge every path
        uses (merge-and-export, bake, TensorRT refit), so they agree bit for bit; callers check finiteness with
        their own advice."""
        delta = self.delta_weight().to(w0.device)
        base = w0.T if in_out else w0
        if delta.shape != base.shape:
            shown = tuple(delta.T.shape) if in_out else tuple(delta.shape)
            raise AdapterError(f"{where}: adapter delta {shown} does not fit weight {tuple(w0.shape)}")
        merged = base.float() + delta
        if self.is_dora:
            g = self.dora_factor(base)
            merged = g.view(-1, *([1] * (merged.dim() - 1))) * merged
        return (merged.T if in_out else merged).to(w0.dtype)

    def contract_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(`[in, r]`, `[r, out]` with the scaling folded in), float32."""
        if self.is_conv:
            raise ValueError("Conv2d adapters have no branched (contract) form; use merged export")
        a = self.A.float().T.contiguous().numpy()
        b = (self.B.float() * self.scaling).T.contiguous().numpy()
        return a, b


@dataclass
class Adapter:
    """A whole adapter: its spec, the adapted modules (paths without `base_model.model.`), provenance.

    `saved` holds PEFT's `modules_to_save`: modules the adapter replaces whole (a classification head), as
    module path -> {parameter path inside the module: tensor}. `base_layers` holds base weights PEFT saved
    beside an adapted embedding (`save_embedding_layers`), as module path -> {"weight": tensor}.
    """

    spec: LoraSpec
    modules: dict[str, ModuleLora]
    name: str = "adapter"
    source: str = ""
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    base_layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def is_dora(self) -> bool:
        return any(m.is_dora for m in self.modules.values())

    def contract_tensors(self) -> dict[str, np.ndarray]:
        """All tensors by graph input name, per the LoRA tensor name contract. A DoRA module's scale depends on
        the graph's base weight: use `SlotTable.adapter_feeds` of a graph read from its file for those."""
        out: dict[str, np.ndarray] = {}
        for path, mod in sorted(self.modules.items()):
            a_name, b_name = weight_names(path)
            out[a_name], out[b_name] = mod.contract_pair()
            if mod.is_dora:
                if mod.scale is None:
                    raise AdapterError(
                        f"adapter {self.name}: {path} is a DoRA module (use_dora); its scale needs the base weight: "
                        "give the branched graph (pack-adapter --graph)"
                    )
                out[dora_name(path)] = mod.scale.float().numpy()
        for module, params in sorted(self.saved.items()):
            for param, value in sorted(params.items()):
                out[saved_name(module, param)] = value.detach().float().contiguous().numpy()
        return out

    def ranks(self) -> dict[str, int]:
        return {p: m.r for p, m in self.modules.items()}

    def num_parameters(self) -> int:
        lora = sum(t.numel() for m in self.modules.values() for t in m.tensors().values())
        return lora + sum(t.numel() for params in self.saved.values() for t in params.values())

    def summary(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "modules": len(self.modules),
            "ranks": sorted(set(self.ranks().values())),
            "parameters": self.num_parameters(),
            "spec": self.spec.to_dict(),
        }
        if self.is_dora:
            out["dora"] = sorted(p for p, m in self.modules.items() if m.is_dora)
        if any(m.embedding for m in self.modules.values()):
            out["embedding"] = sorted(p for p, m in self.modules.items() if m.embedding)
        if self.saved:
            out["modules_to_save"] = sorted(self.saved)
        return out

"""PEFT itself as verify's PyTorch reference: `PeftModel.from_pretrained` on the base model.

Our own LoRA layer reads an adapter the way we understood it; if that reading is wrong (a scaling, a target
list, an init that changes the base), a reference built from the same reading agrees with the mistake. PEFT
reads the adapter directory on its own, so a disagreement between our export and PEFT's forward is exactly
the failure verify exists to find.

- An adapter read from a PEFT directory that is still as it was read (same sha256) is given to PEFT as that
  directory. Any other adapter (in memory, a contract-layout file) is written to a temporary PEFT directory
  first (`write_peft_adapter`); PEFT then checks our layer math and export, not our reading of a file.
- Several adapters load side by side (`load_adapter`, names `a0`, `a1`, ...); a bank batch runs in one
  forward with one adapter per row (`adapter_names=[...]`, `"__base__"` for no adapter).
- `oracle="auto"` uses PEFT when it is installed and our own layer otherwise (`TorchSide`), and the report's
  reference label says which one ran.
"""

from __future__ import annotations

import contextlib
import copy
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lora_export.adapters.adapter import Adapter
from lora_export.errors import UserError
from lora_export.models.loading import LoadedModel, call_model

ORACLES = ("auto", "peft", "lora-export")
BASE_ROW = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


def peft_version() -> str | None:
    try:
        import peft
    except ImportError:
        return None
    return str(peft.__version__)


def resolve_oracle(oracle: str) -> str:
    """ "peft" or "lora-export" for `oracle` ("auto": PEFT when installed)."""
    if oracle not in ORACLES:
        raise UserError(f"unknown oracle {oracle!r}: choose one of {', '.join(ORACLES)}")
    if oracle == "auto":
        return "peft" if peft_version() else "lora-export"
    if oracle == "peft" and not peft_version():
        raise UserError("the PEFT reference needs peft: pip install peft (or choose --oracle lora-export)")
    return oracle


def peft_dir(adapter: Adapter, scratch: Path) -> Path:
    """A PEFT adapter directory holding `adapter`: its own directory when unchanged since it was read."""
    from lora_export.adapters.peft_io import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, write_peft_adapter
    from lora_export.artifacts.fileio import sha256_files

    source = Path(adapter.source) if adapter.source else None
    if adapter.extra.get("peft_config") and source is not None and source.is_dir():
        weights = next((source / n for n in (SAFETENSORS_NAME, BIN_NAME) if (source / n).exists()), None)
        if weights is not None and sha256_files([source / CONFIG_NAME, weights]) == adapter.sha256:
            return source
    if adapter.extra.get("scaling_folded"):
        adapter = unit_scaling_form(adapter)
    return write_peft_adapter(adapter, scratch / f"adapter{len(list(scratch.iterdir()))}")


def unit_scaling_form(adapter: Adapter) -> Adapter:
    """A contract-layout adapter (scaling already in B) as a PEFT config can say it: each module's alpha equals
    its rank (scaling 1), through `rank_pattern` / `alpha_pattern` entries that match that module's path only."""
    from lora_export.adapters.spec import LoraSpec

    ranks = {re.escape(p): m.r for p, m in sorted(adapter.modules.items())}
    top = max(ranks.values())
    spec = LoraSpec(
        r=top, alpha=float(top), target_modules=sorted(adapter.modules), rank_pattern=ranks, alpha_pattern=dict(ranks)
    )
    return Adapter(spec=spec, modules=adapter.modules, name=adapter.name, source=adapter.source)


class _Call(nn.Module):
    """Calls the PEFT model with `adapter_names` (one per batch row) added to the model's own arguments."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model
        self.adapter_names: list[str] | None = None

    def forward(self, *args, **kwargs):
        if self.adapter_names is not None:
            kwargs["adapter_names"] = self.adapter_names
        return self.peft_model(*args, **kwargs)


@dataclass
class PeftSide:
    """PyTorch eager through PEFT: the same interface as `check.TorchSide` (outputs, base_outputs)."""

    loaded: LoadedModel
    adapters: list[Adapter]
    label: str = ""
    dtype: str = "fp32"
    names: list[str] = field(default_factory=list)
    by_layer: bool = False  # the base model's weights read module by module at each forward (`by_layer.jit_module`)

    def __enter__(self) -> PeftSide:
        from peft import PeftModel

        self.label = self.label or (f"torch+peft {peft_version()}" if self.adapters else "torch")  # no LoRA: plain
        self._stack = contextlib.ExitStack()
        scratch = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="lora_export_peft_")))
        if self.by_layer:
            from lora_export.verify.by_layer import jit_module

            base = jit_module(self.loaded)
        else:
            fresh = self.loaded.materialized()  # a lazily loaded model: loaded now, owned here, released on exit
            base = (fresh.module if fresh is not self.loaded else copy.deepcopy(self.loaded.module)).float().eval()
        self.names = [f"a{i}" for i in range(len(self.adapters))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model: Any = base
            for name, adapter in zip(self.names, self.adapters):
                path = str(peft_dir(adapter, scratch))
                try:
                    if model is base:
                        model = PeftModel.from_pretrained(base, path, adapter_name=name)
                    else:
                        model.load_adapter(path, adapter_name=name)
                except Exception as e:  # PEFT refusing an adapter we accepted is itself a disagreement
                    raise UserError(
                        f"PEFT cannot load adapter {adapter.name} ({type(e).__name__}: {_first_line(e)}), which "
                        "lora-export read: fix the adapter (or verify with --oracle lora-export)"
                    ) from e
        self.call = _Call(model.eval())
        self.run = copy.copy(self.loaded)
        self.run.module = self.call
        self.peft_model = model if model is not base else None
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.peft_model = self.call = self.run = None

    def _infer(self, feeds: dict[str, np.ndarray], adapter_names: list[str] | None) -> dict[str, np.ndarray]:
        tensors = {n: torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.loaded.input_names}
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        self.call.adapter_names = adapter_names
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = call_model(self.run, tensors)
        return {n: o.detach().float().numpy() for n, o in zip(self.loaded.output_names, outs)}

    def outputs(self, feeds: dict[str, np.ndarray], rows: list[int] | None) -> dict[str, np.ndarray]:
        if self.peft_model is None:
            return self._infer(feeds, None)
        if rows is None:
            self.peft_model.set_adapter(self.names[0])
            return self._infer(feeds, None)
        return self._infer(feeds, [self.names[i] if i >= 0 else BASE_ROW for i in rows])

    def base_outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.peft_model is None:
            return self._infer(feeds, None)
        with self.peft_model.disable_adapter():
            return self._infer(feeds, None)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__

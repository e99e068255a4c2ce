"""The graph manifest written next to every exported graph (`out.onnx.json`): a `contract.GraphManifest`.

It holds what a later stage, or a Triton model repository config, needs without opening the graph:
inputs/outputs with dtypes and dynamic dims, the LoRA inputs and slots, provenance and versions.
"""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import onnx_ir as ir

from lora_export import __version__
from lora_export.adapters.adapter import Adapter
from lora_export.artifacts.onnxio import graph_io
from lora_export.contract import GraphManifest, SlotTable
from lora_export.models.loading import LoadedModel


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {
        "lora_export": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def adapter_entry(adapter: Adapter) -> dict[str, Any]:
    return {
        "name": adapter.name,
        "source": adapter.source,
        "sha256": adapter.sha256,
        "spec": adapter.spec.to_dict(),
        "modules": len(adapter.modules),
        "ranks": sorted(set(adapter.ranks().values())),
    }


def build_manifest(
    kind: str,
    loaded: LoadedModel,
    model: ir.Model,
    *,
    adapters: list[Adapter] = (),
    dtype: str = "fp32",
    slots: SlotTable | None = None,
) -> GraphManifest:
    manifest = GraphManifest(
        kind=kind,
        model={"source": loaded.source, "arch": loaded.arch},
        adapters=[adapter_entry(a) for a in adapters],
        opset=model.opset_imports.get("", None),
        dtype=dtype,
        dynamic_axes={n: {str(k): v for k, v in ax.items()} for n, ax in loaded.dynamic_axes.items()},
        versions=versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    manifest.set_io(*graph_io(model))
    if slots is not None:
        manifest.set_slots(slots)
    return manifest

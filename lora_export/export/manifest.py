"""The JSON sidecar written next to every exported graph (`out.onnx.json`).

It holds what a later stage, or a Triton model repository config, needs without opening the graph:
inputs/outputs with dtypes and dynamic dims, the LoRA inputs, provenance and versions.
"""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import onnx_ir as ir

from lora_export import __version__
from lora_export.adapters.adapter import Adapter
from lora_export.models.loading import LoadedModel


def value_info(value: ir.Value) -> dict[str, Any]:
    dims = [] if value.shape is None else [d if isinstance(d, int) else str(d.value) for d in value.shape]
    dtype = value.dtype.name.lower() if value.dtype is not None else "unknown"
    return {"name": value.name, "dtype": dtype, "shape": dims}


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


def build_manifest(
    kind: str,
    loaded: LoadedModel,
    model: ir.Model,
    *,
    adapters: list[Adapter] = (),
    dtype: str = "fp32",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    inputs = [value_info(v) for v in model.graph.inputs]
    lora = [i for i in inputs if ".lora_" in i["name"]]
    return {
        "kind": kind,
        "model": {"source": loaded.source, "arch": loaded.arch},
        "adapters": [
            {
                "name": a.name,
                "source": a.source,
                "sha256": a.sha256,
                "spec": a.spec.to_dict(),
                "modules": len(a.modules),
                "ranks": sorted(set(a.ranks().values())),
            }
            for a in adapters
        ],
        "opset": model.opset_imports.get("", None),
        "dtype": dtype,
        "inputs": [i for i in inputs if ".lora_" not in i["name"]],
        "lora_inputs": lora,
        "outputs": [value_info(v) for v in model.graph.outputs],
        "dynamic_axes": {n: {str(k): v for k, v in ax.items()} for n, ax in loaded.dynamic_axes.items()},
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }

"""Write an adapter in the ONNX name-contract layout: `.onnx_adapter` (ORT AdapterFormat), `.safetensors`, `.npz`.

Names are the contract's `weight_names(P)`, A `[in, r]` and B `[r, out]` with the scaling folded into B, plus
DoRA scales `dora_name(P)` and `modules_to_save` parameters `saved_name(M, p)`: exactly the branched graph's
inputs, so ONNX Runtime's `RunOptions.add_active_adapter` can apply the file with no code of ours at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_export.adapters.adapter import Adapter
from lora_export.artifacts.fileio import atomic_path
from lora_export.contract import INPUTS, dtype_name, numpy_dtype
from lora_export.errors import UserError

PACK_SUFFIXES = (".onnx_adapter", ".safetensors", ".npz")


def packed_tensors(adapter: Adapter, dtype: str = "fp32") -> dict[str, np.ndarray]:
    np_dtype = numpy_dtype(dtype)
    return {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in adapter.contract_tensors().items()}


def write_packed(tensors: dict[str, np.ndarray], out: str | Path) -> Path:
    """Write contract tensors to `out`; the format follows the suffix. Atomic: no partial file on failure."""
    out = Path(out)
    if out.suffix not in PACK_SUFFIXES:
        raise UserError(f"{out}: unknown adapter file type; use one of {', '.join(PACK_SUFFIXES)}")
    with atomic_path(out, suffix=out.suffix) as tmp:
        if out.suffix == ".onnx_adapter":
            import onnxruntime as ort

            fmt = ort.AdapterFormat()
            fmt.set_adapter_version(1)
            fmt.set_model_version(1)
            fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
            fmt.export_adapter(str(tmp))
        elif out.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(tensors, str(tmp), metadata={"format": "lora-export-contract"})
        else:
            with open(tmp, "wb") as f:
                np.savez(f, **tensors)
    return out


def pack_adapter(
    adapter: Adapter, out: str | Path, *, dtype: str | None = None, graph: str | Path | None = None
) -> Path:
    """Pack `adapter`; with `graph`, check it fits that graph's LoRA inputs first (nothing written otherwise).

    `dtype` defaults to the graph's LoRA input dtype (ONNX Runtime refuses an adapter of another dtype), or fp32.
    """
    if graph is not None:
        from lora_export.artifacts.onnxio import read_slots

        slots = read_slots(graph)
        if slots.layout != INPUTS:
            raise UserError(f"{graph} is a {slots.layout} graph; packed adapters are for inputs-layout graphs")
        slots.check_adapter(adapter)
        graph_dtype = slots.dtype
        if dtype is not None and dtype_name(dtype) != graph_dtype:
            raise UserError(
                f"--dtype {dtype} does not match {graph}'s {graph_dtype} LoRA inputs (ONNX Runtime would refuse it): "
                f"use --dtype {graph_dtype}"
            )
        return write_packed(slots.adapter_feeds(adapter), out)  # DoRA scales use the graph's base weights
    return write_packed(packed_tensors(adapter, dtype or "fp32"), out)

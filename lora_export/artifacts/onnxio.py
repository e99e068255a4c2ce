"""Reading graphs without running them: headers, LoRA slots, I/O entries, and the graph manifest beside them.

Low in the package (below export/, passes/, engines/, runtime/, verify/): it imports only the contract, the
error and file helpers, and `onnx` / `onnx_ir` lazily, so the serving runtime can use it without the
export stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_export.artifacts.fileio import manifest_path, read_json, write_json
from lora_export.contract import SLOTS_METADATA, GraphManifest, SlotTable
from lora_export.errors import UserError

# Weights above this many bytes go to a side file (`<graph>.data`), written one tensor at a time. Protobuf
# cannot hold a message over 2 GB, and a graph with its weights inside is built whole in memory (two to three
# times the weights) before it is written; only small graphs are kept in one file.
EXTERNAL_DATA_THRESHOLD = 64 * 1024**2


def load_onnx_header(path: str | Path):
    """The graph without external weights; a missing or corrupt file is a one-line user error."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"cannot read {path} as ONNX ({type(e).__name__}): is it a complete .onnx file?") from None


def proto_dims(value_info) -> list:
    """Dims of an `onnx.ValueInfoProto`: ints, dim labels, or 0 where the dim is unknown."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def slots_of_proto(model, base=None) -> SlotTable:
    """The LoRA slots of an `onnx.ModelProto` (`base`: where to read its base weights, see InitializerReader)."""
    meta = {p.key: p.value for p in model.metadata_props}.get(SLOTS_METADATA)
    values = ((i.name, proto_dims(i), i.type.tensor_type.elem_type) for i in model.graph.input)
    return SlotTable.from_inputs(values, meta, base)


def read_slots(path: str | Path) -> SlotTable:
    """The LoRA slots of the graph at `path` (its header; base weights are read from the file when needed)."""
    return slots_of_proto(load_onnx_header(path), InitializerReader(path))


def ir_dims(value) -> list:
    """Dims of an `onnx_ir.Value`: ints and dim labels (empty when the shape is unknown)."""
    return [] if value.shape is None else [d if isinstance(d, int) else str(d.value) for d in value.shape]


def ir_initializers(model, where: str = "the graph"):
    """An `onnx_ir.Model`'s initializers by name as numpy arrays (a `contract.BaseWeights`: the base weights
    DoRA scales and `modules_to_save` bank rows need)."""
    import numpy as np

    def base(name: str):
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise UserError(f"{where} has no initializer {name!r}: the graph does not hold that base weight")
        return np.asarray(value.const_value.numpy())

    return base


def slots_of_ir(model) -> SlotTable:
    """The LoRA slots of an `onnx_ir.Model` (its initializers serve as the base weights)."""
    values = ((v.name, ir_dims(v), v.dtype) for v in model.graph.inputs if v.dtype is not None)
    return SlotTable.from_inputs(values, model.metadata_props.get(SLOTS_METADATA), ir_initializers(model))


def value_info(value) -> dict[str, Any]:
    """A manifest I/O entry for an `onnx_ir.Value`: name, dtype (`float`, `float16`, `int64`...), shape."""
    dtype = value.dtype.name.lower() if value.dtype is not None else "unknown"
    return {"name": value.name, "dtype": dtype, "shape": ir_dims(value)}


def graph_io(model) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) of an `onnx_ir.Model` as manifest entries."""
    return [value_info(v) for v in model.graph.inputs], [value_info(v) for v in model.graph.outputs]


def read_manifest(graph: str | Path) -> GraphManifest | None:
    """The manifest beside `graph` (`graph.json`), or None when there is none."""
    path = manifest_path(graph)
    return GraphManifest.from_dict(read_json(path)) if path.is_file() else None


def write_manifest(graph: str | Path, manifest: GraphManifest) -> Path:
    path = manifest_path(graph)
    write_json(path, manifest.to_dict())
    return path


class InitializerReader:
    """A graph's initializers by name, read on first use (DoRA scales and bank rows of `modules_to_save` need the
    base weights); a `contract.BaseWeights`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._read = None

    def __call__(self, name: str):
        import onnx_ir as ir

        if self._read is None:
            self._read = ir_initializers(ir.load(str(self.path)), str(self.path))
        return self._read(name)

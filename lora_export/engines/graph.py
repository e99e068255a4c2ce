"""Make an exported graph ready for TensorRT's ONNX parser (pure onnx/numpy; no TensorRT needed).

TensorRT's ONNX parser treats a graph input that also has a same-name initializer as a *weight*
(onnx-tensorrt `ModelImporter::importInputs` skips initializers), so our branched graphs, whose LoRA
inputs carry rank-0 defaults, would be built with the branch folded away. Two ways out:

- `lora_as="inputs"`: drop the defaults; the LoRA tensors become real engine inputs with a dynamic
  rank dim (profile default 0..64, opt 8; feed rank 0 for "no adapter"). Swap adapters per call, no refit.
- `lora_as="weights"`: drop the LoRA inputs and give each slot a zero initializer padded to rank R
  (`[in, R]`, `[R, out]`); zero-padded rank columns contribute nothing, so any adapter of rank <= R is
  exact. Build with `--refit` and swap adapters by refitting A and B.

Merged/base graphs pass through unchanged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lora_export.artifacts import onnxio
from lora_export.contract import GraphManifest, dtype_name, is_lora_tensor, precision, weight_names
from lora_export.errors import UserError

LORA_AS = ("inputs", "weights")
DEFAULT_WEIGHTS_RANK = 16


@dataclass
class PreparedGraph:
    model: onnx.ModelProto
    kind: str  # base, merged, branched-inputs, branched-bank, unknown
    lora_as: str | None = None  # None for merged/base graphs
    lora_rank: int | None = None  # R when lora_as == "weights"
    lora_modules: list[dict] = field(default_factory=list)
    weights_dtype: str | None = None
    changes: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> list[dict]:
        """The graph inputs TensorRT will see, manifest-style (`shape` mixes ints and dim labels)."""
        return graph_inputs(self.model)


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [
        d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
        for d in value_info.type.tensor_type.shape.dim
    ]


def graph_inputs(model: onnx.ModelProto) -> list[dict]:
    inits = {t.name for t in model.graph.initializer}
    return [
        {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            "shape": _dims(v),
        }
        for v in model.graph.input
        if v.name not in inits
    ]


def _lora_input_names(model: onnx.ModelProto) -> list[str]:
    return [v.name for v in model.graph.input if is_lora_tensor(v.name)]


def _remove_initializers(model: onnx.ModelProto, names: set[str]) -> list[str]:
    keep = [t for t in model.graph.initializer if t.name not in names]
    removed = [t.name for t in model.graph.initializer if t.name in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return removed


def prepare_graph(
    model: onnx.ModelProto,
    manifest: GraphManifest | dict[str, Any] | None,
    *,
    lora_as: str = "inputs",
    lora_rank: int | None = None,
) -> PreparedGraph:
    """Rewrite `model` (in place) for TensorRT; see the module docstring for the two LoRA modes. `manifest`:
    the graph's manifest (or its JSON form), for the graph kind and its LoRA slots."""
    if lora_as not in LORA_AS:
        raise UserError(f"--lora-as {lora_as!r}: choose inputs or weights")
    if isinstance(manifest, dict):
        manifest = GraphManifest.from_dict({"kind": "unknown", **manifest})
    manifest = manifest or GraphManifest(kind="unknown")
    kind = manifest.kind
    lora_names = _lora_input_names(model)
    if not lora_names:
        if lora_rank is not None and lora_as == "weights":
            raise UserError("--lora-as weights/--lora-rank apply to branched graphs; this graph has no LoRA inputs")
        return PreparedGraph(model, kind)
    modules = manifest.lora_modules
    if lora_as == "inputs":
        removed = _remove_initializers(model, set(lora_names))
        return PreparedGraph(
            model,
            kind,
            lora_as="inputs",
            lora_modules=modules,
            changes=[f"dropped {len(removed)} rank-0 LoRA defaults so TensorRT keeps them as inputs"],
        )
    if kind != "branched-inputs" or not modules:
        raise UserError(f"--lora-as weights needs a branched graph of layout 'inputs' (this one is {kind!r})")
    rank = DEFAULT_WEIGHTS_RANK if lora_rank is None else lora_rank
    if rank < 1:
        raise UserError(f"--lora-rank {rank}: must be at least 1")
    by_name = {v.name: v for v in model.graph.input}
    elem = by_name[lora_names[0]].type.tensor_type.elem_type
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    keep_inputs = [v for v in model.graph.input if v.name not in set(lora_names)]
    del model.graph.input[:]
    model.graph.input.extend(keep_inputs)
    _remove_initializers(model, set(lora_names))
    for slot in manifest.slots:
        a_name, b_name = weight_names(slot.path)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros((slot.in_features, rank), np_dtype), a_name))
        model.graph.initializer.append(numpy_helper.from_array(np.zeros((rank, slot.out_features), np_dtype), b_name))
    return PreparedGraph(
        model,
        kind,
        lora_as="weights",
        lora_rank=rank,
        lora_modules=modules,
        weights_dtype=np.dtype(np_dtype).name,
        changes=[f"LoRA inputs of {len(modules)} modules turned into zero weights of rank {rank} (refit A and B)"],
    )


def save_graph(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` for the parser; weights go to a side file when protobuf's 2 GB limit is near."""
    path = Path(path)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > onnxio.EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
        )
    else:
        onnx.save_model(model, str(path))
    return path


def precision_of(model: onnx.ModelProto) -> str:
    """'fp16'/'bf16'/'fp32': the type of most float weights (the graph outputs' when it has none)."""
    counts: Counter = Counter()
    for t in model.graph.initializer:  # weighted by element count: small fp32 constants do not decide
        try:
            name = dtype_name(t.data_type)
        except ValueError:
            continue  # not a float type
        counts[name] += int(np.prod(t.dims)) if len(t.dims) else 1
    if counts:
        return counts.most_common(1)[0][0]
    return precision(v.type.tensor_type.elem_type for v in model.graph.output)

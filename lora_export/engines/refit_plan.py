"""What a refit sets: engine weight names and their new values, computed with numpy from the ONNX graph.

Merged engines: each adapted module `P` has its base weight initializer `P.weight` in the graph, in the
layout the graph uses it in: `[in, out]` when a MatMul/Gemm reads it directly (GPT-2 Conv1D), `[out, in]`
when it goes through a Transpose or a `Gemm(transB=1)` (nn.Linear), the kernel layout for Conv. The new
value is `W0 + s·B·A` computed in float32 from the *base* weight and cast back to the graph's dtype
(as `export_merged` does), so a refit engine holds exactly what a merged export of that adapter holds.

Blended adapters (reported against TensorRT as NVIDIA/TensorRT#3628): a refit only replaces the weights it
is given, so swapping
adapter X for Y must also put back the base value of every weight X changed and Y does not; otherwise
the engine runs "Y plus the rest of X". `previous` (the weights the engine's current adapter changed,
tracked in `OUT.plan.json`) drives that restoration.

Branched engines built with LoRA tensors as weights (`lora_as="weights"`, rank R): A `[in, R]` and
B `[R, out]` (scaling folded into B) zero-padded from the adapter's rank; modules the previous adapter
used and the new one does not are reset to zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.ties import other_readers
from lora_export.contract import INPUTS, Slot, SlotTable, weight_names
from lora_export.errors import AdapterError, UserError


@dataclass
class RefitPlan:
    values: dict[str, np.ndarray]  # engine weight name -> new value (graph layout and dtype)
    adapted: list[str] = field(default_factory=list)  # weights that now differ from base
    restored: list[str] = field(default_factory=list)  # weights put back to base (or zeros)

    def summary(self) -> dict:
        return {"weights": len(self.values), "adapted": len(self.adapted), "restored": len(self.restored)}


def restoration_set(previous: set[str] | list[str] | None, new: set[str] | list[str]) -> list[str]:
    """Weights the previous adapter changed that the new one does not: they go back to base."""
    return sorted(set(previous or ()) - set(new))


class GraphWeights:
    """Initializers of an ONNX graph by name, converted to numpy on demand, with their consumers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.protos = {t.name: t for t in model.graph.initializer}
        self._consumers: dict[str, list[tuple[onnx.NodeProto, int]]] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.protos

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.protos[name])

    def consumers(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        if self._consumers is None:
            self._consumers = {}
            for node in self.model.graph.node:
                for k, inp in enumerate(node.input):
                    if inp in self.protos:
                        self._consumers.setdefault(inp, []).append((node, k))
        return self._consumers.get(name, [])


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def weight_layout(weights: GraphWeights, name: str) -> str:
    """'in_out', 'out_in' or 'kernel' for initializer `name`, from how the graph consumes it."""
    layouts = set()
    for node, k in weights.consumers(name):
        op = node.op_type
        if op == "Gather" and k == 0:  # the same tensor as an embedding table (tied): not this layer's read
            continue
        if op == "Transpose" and list(_attr(node, "perm", [1, 0])) == [1, 0]:
            layouts.add("out_in")
        elif op == "Gemm" and k == 1:
            layouts.add("out_in" if _attr(node, "transB", 0) else "in_out")
        elif op == "MatMul" and k == 1:
            layouts.add("in_out")
        elif op in ("Conv", "ConvTranspose") and k == 1:
            layouts.add("kernel")
        else:
            layouts.add(f"?{op}:{k}")
    known = {x for x in layouts if not x.startswith("?")}
    if len(known) == 1 and len(layouts) == 1:
        return known.pop()
    raise UserError(
        f"cannot tell how the graph uses weight {name} (consumers: {', '.join(sorted(layouts)) or 'none'}); "
        "refit supports weights read by MatMul, Gemm, Transpose([1,0]) or Conv"
    )


def check_untied(engine: GraphWeights, name: str, path: str) -> None:
    """A refit replaces a weight everywhere the engine reads it: refuse one that another kind of node also reads
    (an `lm_head` tied to the input embeddings), which must keep its base value (`ties.other_readers`)."""
    tied = other_readers((node.op_type, k) for node, k in engine.consumers(name))
    if tied:
        raise UserError(
            f"cannot refit {path}: the engine's graph reads its weight {name} in {', '.join(tied)} too (tied, e.g. "
            "the input embeddings), which must keep the base value; build the engine from a graph where "
            f"{path} has its own weight (a merge-and-export of an adapter on {path}, or export-branched)"
        )


def merged_refit_plan(
    base: GraphWeights,
    adapter: Adapter | None,
    previous: set[str] | list[str] | None,
    engine: GraphWeights | None = None,
) -> RefitPlan:
    """Values for a merged engine: `W0 + s·B·A` for the adapter's modules, `W0` for weights to restore.

    `base` holds the base model's weights (a base export, or a merged export's untouched initializers);
    `engine` is the graph the engine was built from (default: `base`), where no adapted weight may be tied to
    another use; `adapter=None` means "back to the base model".
    """
    values: dict[str, np.ndarray] = {}
    adapted = []
    for path, lora in sorted((adapter.modules if adapter else {}).items()):
        name = f"{path}.weight"
        if name not in base:
            raise AdapterError(f"adapter module {path}: the graph has no initializer {name}")
        check_untied(engine or base, name, path)
        w0 = base.array(name)
        layout = weight_layout(base, name)
        where = f"adapter module {path} ({name}, {layout})"
        merged = lora.merged_with(torch.from_numpy(np.array(w0)), in_out=layout == "in_out", where=where).numpy()
        if not np.isfinite(merged).all():
            raise AdapterError(f"{path}: merging gives NaN/Inf in {w0.dtype}; use an fp32 graph")
        values[name] = merged
        adapted.append(name)
    restored = restoration_set(previous, adapted)
    for name in restored:
        if name not in base:
            raise UserError(f"cannot restore {name}: not an initializer of the base graph")
        values[name] = base.array(name)
    return RefitPlan(values, adapted, restored)


def branched_refit_plan(
    lora_modules: list[dict],
    rank: int,
    dtype: str,
    adapter: Adapter | None,
    previous: set[str] | list[str] | None,
) -> RefitPlan:
    """Values for a branched engine with LoRA tensors as rank-`rank` weights (A `[in, R]`, B `[R, out]`).
    `lora_modules`: the engine's slots as its manifest records them (`Slot.to_dict()`)."""
    slots = [Slot.from_dict(m) for m in lora_modules]
    np_dtype = np.dtype(dtype)
    values: dict[str, np.ndarray] = {}
    adapted = []
    if adapter is not None:
        table = SlotTable(INPUTS, {s.path: s for s in slots})
        table.check_adapter(
            adapter, max_rank=rank, rank_limit="the engine's LoRA rank", rank_fix="rebuild with --lora-rank"
        )
    for path, lora in sorted((adapter.modules if adapter else {}).items()):
        slot = next(s for s in slots if s.path == path)
        a, b = lora.contract_pair()  # (in, r), (r, out) with the scaling in b
        a_pad = np.zeros((slot.in_features, rank), np.float32)
        b_pad = np.zeros((rank, slot.out_features), np.float32)
        a_pad[:, : lora.r], b_pad[: lora.r] = a, b
        a_name, b_name = weight_names(path)
        values[a_name], values[b_name] = a_pad.astype(np_dtype), b_pad.astype(np_dtype)
        adapted += [a_name, b_name]
    restored = restoration_set(previous, adapted)
    by_name = {n: (s, k) for s in slots for k, n in enumerate(weight_names(s.path))}
    for name in restored:
        if name not in by_name:
            raise UserError(f"cannot reset {name}: not a LoRA weight of this engine")
        s, k = by_name[name]
        values[name] = np.zeros((s.in_features, rank) if k == 0 else (rank, s.out_features), np_dtype)
    return RefitPlan(values, adapted, restored)


def changed_weights(source: GraphWeights, base: GraphWeights) -> list[str]:
    """Initializers whose values differ between a merged graph and its base graph (the baked adapter)."""
    out = []
    for name, proto in source.protos.items():
        other = base.protos.get(name)
        if other is None or proto.dims != other.dims:
            continue
        if proto.raw_data and other.raw_data:
            differs = proto.raw_data != other.raw_data
        else:
            differs = not np.array_equal(source.array(name), base.array(name))
        if differs:
            out.append(name)
    return sorted(out)

"""`Float16Pass`: compute in float16, keeping numerically sensitive ops and the LoRA branches in float32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lora_export.contract import is_lora_input
from lora_export.passes.contract import LoraPass, lora_region

FP32, FP16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = 65504.0

# Ops kept in float32: normalizations, softmax, reductions and their building blocks (RMSNorm is
# Pow -> ReduceMean -> Sqrt -> Reciprocal in exported Llama graphs), and ops whose float inputs ORT's
# kernels only take as float32.
KEEP_FP32 = frozenset(
    {
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "BatchNormalization",
        "RMSNormalization",
        "Softmax",
        "LogSoftmax",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Exp",
        "Log",
        "Erf",
        "Range",
        "CumSum",
        "TopK",
    }
)
# (op, input index) whose float input is float32 whatever the other inputs are
FIXED_FP32_INPUTS = {("Resize", 1), ("Resize", 2)}


def _to_fp16(array: np.ndarray) -> np.ndarray:
    """Clip finite values into float16's range (`finfo(float32).min` masks stay finite), keep inf/nan."""
    finite = np.isfinite(array)
    clipped = np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array)
    return clipped.astype(np.float16)


class Float16Pass(LoraPass, ir.passes.InPlacePass):
    """Rewrite rules:

    1. nodes outside the keep set compute in float16: their float32 outputs become float16, float32
       `Constant`/`ConstantOfShape` values are converted, `Cast(to=FLOAT)` becomes `Cast(to=FLOAT16)`;
    2. keep set (float32): ops in `KEEP_FP32` and, with `keep_lora`, the LoRA branches (from the LoRA inputs
       to the Add that joins the base output), so the low-rank accumulation runs in float32;
    3. float32 initializers read by any float16 node become float16 under the same name (base weights keep
       their names); those read only by float32 nodes (LayerNorm scales) stay float32;
    4. non-LoRA float32 graph inputs and outputs become float16; LoRA inputs keep their dtype, shapes and
       defaults, so adapters packed for the float32 graph still load;
    5. where a float16 value meets a float32 node input, or the reverse, one shared `Cast` is inserted.

    Values are clipped to +-65504 on conversion, so `finfo(float32).min` attention masks stay finite.
    """

    dtype_changed = True  # base weights become float16 (the contract check allows it)

    def __init__(self, *, keep_lora: bool = True, keep_ops: frozenset[str] = KEEP_FP32):
        super().__init__()
        self.keep_lora = keep_lora
        self.keep_ops = keep_ops
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        keep = {n for n in graph if n.op_type in self.keep_ops and n.domain in ("", "com.microsoft")}
        if self.keep_lora:
            keep |= lora_region(model)
        modified = False
        # 1. graph inputs (not LoRA) and initializers
        for v in graph.inputs:
            if v.dtype == FP32 and not is_lora_input(v.name) and v.const_value is None:
                v.dtype = FP16
                modified = True
        for name, v in list(graph.initializers.items()):
            if v.dtype != FP32 or v.is_graph_input() or v.const_value is None:
                continue
            if any(node not in keep for node, _ in v.uses()):
                v.const_value = ir.tensor(_to_fp16(v.const_value.numpy()), name=name)
                v.dtype = FP16
                modified = True
        # 2. nodes outside the keep set compute in float16
        for node in graph:
            if node in keep:
                continue
            if node.op_type == "Cast" and node.attributes["to"].value == FP32:
                node.attributes["to"] = ir.AttrInt64("to", FP16)
            if node.op_type == "ConstantOfShape" and "value" not in node.attributes and node.outputs[0].dtype == FP32:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float16)))
            if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
                t = node.attributes["value"].as_tensor()
                if t.dtype == FP32:
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_to_fp16(t.numpy())))
            for out in node.outputs:
                if out.dtype == FP32:
                    out.dtype = FP16
                    modified = True
        # 3. casts at the boundaries
        casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        for node in list(graph):
            if node.op_type == "Cast" and node.name and node.name.startswith("fp16_pass/"):
                continue
            for i, v in enumerate(node.inputs):
                if v is None or v.dtype not in (FP16, FP32):
                    continue
                want = FP32 if (node in keep or (node.op_type, i) in FIXED_FP32_INPUTS) else FP16
                if node.op_type in ("Shape", "Size") or v.dtype == want:
                    continue
                if node.op_type == "Cast":
                    continue  # a Cast reads any type
                key = (id(v), want)
                if key not in casts:
                    cast = ir.node(
                        "Cast",
                        [v],
                        attributes={"to": want},
                        name=f"fp16_pass/cast_{len(casts)}",
                    )
                    cast.outputs[0].name = f"{v.name}_as_{'fp32' if want == FP32 else 'fp16'}"
                    cast.outputs[0].dtype = want
                    cast.outputs[0].shape = v.shape
                    graph.insert_before(node, cast)
                    casts[key] = cast.outputs[0]
                node.replace_input_with(i, casts[key])
        # 4. a graph output computed by a kept op (BERT's final LayerNorm) gets a Cast, keeping its name
        for k, out in enumerate(list(graph.outputs)):
            if out.dtype == FP32 and out.producer() is not None and not is_lora_input(out.name):
                name = out.name
                out.name = f"{name}_fp32"
                cast = ir.node("Cast", [out], attributes={"to": FP16}, name=f"fp16_pass/output_{k}")
                cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = name, FP16, out.shape
                graph.append(cast)
                graph.outputs[k] = cast.outputs[0]
                modified = True
        if casts:
            self.notes.append(f"float16 with {len(keep)} float32 node(s) kept, {len(casts)} cast(s) inserted")
        return ir.passes.PassResult(model, modified=modified or bool(casts))

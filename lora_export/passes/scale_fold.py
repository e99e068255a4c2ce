"""`FoldLoraScalePass`: move a LoRA branch's scalar scale into its B matrix when B is a constant."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lora_export.passes.contract import LoraPass, single_use


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a constant of one element (initializer or Constant node), else None."""
    if value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
            tensor = producer.attributes["value"].as_tensor()
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _constant_b(value: ir.Value) -> tuple[ir.Value | None, str]:
    """The initializer holding B (directly, or under Transpose as PEFT's `x @ B^T`), or why there is none."""
    if value.is_graph_input():
        return None, f"B ({value.name}) is a graph input (an adapter slot): its feeds carry the scale"
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.inputs[0] is not None:
        value = producer.inputs[0]
        if value.is_graph_input():
            return None, f"B ({value.name}) is a graph input (an adapter slot): its feeds carry the scale"
    if not value.is_initializer() or value.const_value is None:
        return None, f"B ({value.name}) is computed, not a constant"
    if len(value.uses()) != 1:
        return None, f"B ({value.name}) is read by {len(value.uses())} nodes: scaling it would change the others"
    return value, ""


class FoldLoraScalePass(LoraPass, ir.passes.InPlacePass):
    """Rewrite rules:

    1. `Mul(MatMul(MatMul(x, A), B), s)` (or `Mul(s, ...)`), `s` a one-element constant, `B` an initializer
       read only here -> `MatMul(MatMul(x, A), B')` with `B' = s·B` stored under B's own name;
    2. the same with `B` under `Transpose` (`x @ B^T`, as PEFT-traced graphs have it): the initializer under
       the Transpose is scaled;
    3. `Div(..., c)` is rule 1 with `s = 1/c`.

    When B is a graph input (our branched graphs: the scale is already folded into the fed B) or shared,
    the branch is left alone and the reason is appended to `self.notes`.
    """

    def __init__(self):
        super().__init__()
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.notes = []
        modified = False
        for node in list(model.graph):
            if node.op_type not in ("Mul", "Div") or node.domain != "" or len(node.inputs) != 2:
                continue
            if node.outputs[0].is_graph_output():
                continue  # folding would rename a graph output
            for k in (0, 1) if node.op_type == "Mul" else (0,):
                branch, scale = node.inputs[k], _scalar(node.inputs[1 - k])
                if branch is None or scale is None:
                    continue
                if node.op_type == "Div":
                    if scale == 0:
                        break
                    scale = 1.0 / scale
                mm_b = branch.producer()
                if mm_b is None or mm_b.op_type != "MatMul" or single_use(branch) is not node:
                    continue
                inner = mm_b.inputs[0].producer() if mm_b.inputs[0] is not None else None
                if inner is None or inner.op_type != "MatMul":
                    continue
                b_value, why = _constant_b(mm_b.inputs[1])
                if b_value is None:
                    self.notes.append(f"scale {scale:g} after {mm_b.name or 'MatMul'} not folded: {why}")
                    break
                b = b_value.const_value.numpy()
                b_value.const_value = ir.tensor(
                    (b * np.asarray(scale, dtype=b.dtype)).astype(b.dtype), name=b_value.name
                )
                ir.convenience.replace_all_uses_with(node.outputs[0], branch)
                model.graph.remove(node, safe=True)
                modified = True
                break
        return ir.passes.PassResult(model, modified=modified)

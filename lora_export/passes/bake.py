"""`BakeAdapterPass`: fold one adapter into the base weights of a branched graph (a merged graph, no re-trace)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.ties import other_readers
from lora_export.artifacts.onnxio import slots_of_ir
from lora_export.contract import BANK, MERGED
from lora_export.errors import AdapterError, UserError
from lora_export.passes.contract import Branch, LoraPass, find_branches, lora_inputs

_PASSTHROUGH = ("Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def find_base_weight(base: ir.Value) -> tuple[ir.Value, bool]:
    """The weight initializer whose product is `base`, and whether it is stored `[in, out]`.

    Walks up through reshapes and a bias `Add` to the `MatMul`/`Gemm`: GPT-2's `Conv1D` uses its `[in, out]`
    weight directly (`Gemm` transB=0 or `MatMul`), `nn.Linear` reads its `[out, in]` weight under a
    `Transpose` (or `Gemm` transB=1).
    """
    value = base
    for _ in range(8):
        node = value.producer()
        if node is None:
            break
        if node.op_type in _PASSTHROUGH:
            value = node.inputs[0]
            continue
        if node.op_type == "Add":
            consts = [i for i in node.inputs if i is not None and i.is_initializer()]
            others = [i for i in node.inputs if i is not None and not i.is_initializer()]
            if len(consts) == 1 and len(others) == 1:
                value = others[0]  # the bias
                continue
            break
        if node.op_type not in ("MatMul", "Gemm"):
            break
        if node.op_type == "Gemm":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                break
            in_out = not attrs.get("transB", 0)
        else:
            in_out = True
        weight = node.inputs[1]
        producer = weight.producer()
        if producer is not None and producer.op_type == "Transpose":
            perm = producer.attributes.get("perm")
            if perm is not None and list(perm.value) != [1, 0]:
                break
            weight, in_out = producer.inputs[0], not in_out
        if weight.is_initializer() and not weight.is_graph_input() and weight.const_value is not None:
            return weight, in_out
        break
    raise UserError(
        f"cannot bake: the base output {base.name} is not a MatMul/Gemm of a weight initializer "
        "(was this graph made by export-branched?)"
    )


class BakeAdapterPass(LoraPass, ir.passes.InPlacePass):
    """Rewrite rules, per LoRA branch `y = Add(base, MatMul(MatMul(x, A), B))` (A, B: the module's inputs):

    1. find the base weight `W` of `base` (see `find_base_weight`); `W := W + s·B·A` computed in float32 as
       `merge-and-export` does (`W + (s·B·A)^T` for `[in, out]` Conv1D weights), keeping W's name;
    2. uses of `y` read `base`; the branch's nodes go;
    3. modules the adapter leaves out lose their branch unchanged (their delta is zero);
    4. the LoRA inputs and their default initializers are removed: the result is a merged graph.

    Refuses bank graphs, adapters with modules the graph has no slot for, shapes that do not fit, weights
    another kind of node reads too (tied with an embedding: `ties.other_readers`), and non-finite results.
    """

    lora_removed = True  # the result is a merged graph
    weights_changed = True

    def __init__(self, adapter: Adapter, *, allow_nonfinite: bool = False):
        super().__init__()
        self.adapter = adapter
        self.allow_nonfinite = allow_nonfinite
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from lora_export.passes.quantize import refuse_quantized

        refuse_quantized(model, "--bake")
        graph = model.graph
        names = {v.name for v in lora_inputs(model)}
        slots = slots_of_ir(model)
        if slots.layout == BANK:
            raise UserError("--bake needs an inputs-layout graph; this is a bank graph (export-branched --layout bank)")
        branches = find_branches(model)
        if slots.layout == MERGED or not branches:
            raise UserError("--bake needs a branched graph with LoRA inputs; this graph has none")
        if slots.saved or any(s.dora for s in slots.slots.values()):
            raise UserError(
                "--bake folds plain LoRA branches; this graph has DoRA or modules_to_save inputs: "
                "use merge-and-export for a merged graph of such an adapter"
            )
        slots.check_adapter(self.adapter)
        by_path = {b.path: b for b in branches}
        unknown = sorted(set(self.adapter.modules) - set(by_path))
        if unknown:  # a slot whose branch the passes no longer recognise
            raise UserError(f"cannot bake {unknown[0]}: its LoRA branch is not a MatMul(MatMul(x, A), B)")
        for br in branches:
            if br.join is None:
                raise UserError(f"cannot bake {br.path}: its branch is not added to a base output")
            mod = self.adapter.modules.get(br.path)
            if mod is not None:
                self._fold(br, mod)
        for br in branches:
            joined = br.join.outputs[0]
            output_name = joined.name if joined.is_graph_output() else None  # a slot on the last layer (lm_head)
            ir.convenience.replace_all_uses_with(joined, br.base, replace_graph_outputs=True)
            if output_name is not None:  # the graph output keeps its name (`logits`), not the base MatMul's
                joined.name = f"{output_name}.lora_join"
                br.base.name = output_name
            for node in (br.join, br.mm_b, br.mm_a):
                if not any(o.uses() or o.is_graph_output() for o in node.outputs):
                    graph.remove(node, safe=True)
        for v in list(graph.inputs):
            if v.name in names and not v.uses():
                graph.inputs.remove(v)
                graph.initializers.pop(v.name, None)
        self.notes.append(f"baked {len(self.adapter.modules)} module(s) of adapter {self.adapter.name}")
        return ir.passes.PassResult(model, modified=True)

    def _fold(self, br: Branch, mod) -> None:
        weight, in_out = find_base_weight(br.base)
        tied = other_readers((use.node.op_type, use.idx) for use in weight.uses())
        if tied:
            raise UserError(
                f"cannot bake {br.path}: its weight {weight.name} is also read by {', '.join(tied)} (tied, e.g. the "
                "input embeddings), which must keep the base value; re-export the branched graph with export-branched "
                "(it gives each LoRA slot a weight of its own)"
            )
        w0 = torch.from_numpy(np.array(weight.const_value.numpy()))
        merged = mod.merged_with(w0, in_out=in_out, where=f"{br.path} ({weight.name})")  # as merge-and-export
        if not self.allow_nonfinite and not torch.isfinite(merged).all():
            raise AdapterError(f"{br.path}: baking gives NaN/Inf in {w0.dtype}; pass --allow-nonfinite to accept it")
        weight.const_value = ir.tensor(merged.numpy(), name=weight.name)

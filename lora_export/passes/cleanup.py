"""`CleanupPass`: constant folding, identity/dead-node removal, CSE, shape inference, topological order.

Built from onnx-ir's common passes and onnxscript's constant folder, with the folder told never to fold a
node that reads a protected tensor (a LoRA input, its default, or a base weight): folding `Transpose(W)`
would replace `W` by an anonymous `val_N` that TensorRT refit can no longer address, and folding a node
that reads a LoRA input's rank-0 default would bake "no adapter" into the graph. No initializer
deduplication is run: two LoRA defaults are both all-zero tensors of equal shape and must stay apart.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lora_export.passes.contract import LoraPass, protected_names


class CleanupPass(LoraPass, ir.passes.InPlacePass):
    """Rewrite rules (each from onnx-ir / onnxscript, all name-preserving here):

    1. fold constant subgraphs unless a node reads a LoRA input or base weight (onnxscript FoldConstantsPass);
    2. `y = Identity(x)` -> uses of `y` read `x` (IdentityEliminationPass);
    3. drop nodes and initializers nothing reads (RemoveUnusedNodesPass);
    4. two nodes with the same op, inputs and attributes -> one (CommonSubexpressionEliminationPass);
    5. annotate value shapes and types (ShapeInferencePass; a failure leaves the model unchanged);
    6. sort nodes topologically (TopologicalSortPass).
    """

    def __init__(self, *, fold: bool = True, shape_inference: bool = True):
        super().__init__()
        self.fold = fold
        self.shape_inference = shape_inference

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        protected = protected_names(model)
        steps: list[ir.passes.PassBase] = []
        if self.fold:
            from onnxscript.optimizer import _constant_folding

            def should_fold(node: ir.Node) -> bool | None:
                if any(v is not None and v.name in protected for v in node.inputs):
                    return False
                return None

            steps.append(
                _constant_folding.FoldConstantsPass(
                    shape_inference=False, input_size_limit=8192, output_size_limit=262144, should_fold=should_fold
                )
            )
        steps += [
            common_passes.IdentityEliminationPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.CommonSubexpressionEliminationPass(),
            common_passes.RemoveUnusedNodesPass(),
        ]
        if self.shape_inference:
            steps.append(common_passes.ShapeInferencePass(strict_mode=False))
        steps.append(common_passes.TopologicalSortPass())
        before = _fingerprint(model)
        ir.passes.Sequential(*steps)(model)
        return ir.passes.PassResult(model, modified=_fingerprint(model) != before)


def _fingerprint(model: ir.Model) -> tuple:
    return tuple((n.op_type, len(n.inputs)) for n in model.graph) + (len(model.graph.initializers),)

"""`FuseSiblingBranchesPass`: LoRA branches that read the same input share one `x·A` MatMul."""

from __future__ import annotations

import onnx_ir as ir

from lora_export.passes.contract import LoraPass, find_branches


class FuseSiblingBranchesPass(LoraPass, ir.passes.InPlacePass):
    """Rewrite rule, for n >= 2 branches `h_k = MatMul(x, A_k)` on the same `x` (q/k/v, gate/up):

        A_cat = Concat(A_1, ..., A_n, axis=1)                     # (in, r_1 + ... + r_n), built per call
        H     = MatMul(x, A_cat)                                  # (..., sum r)
        sizes = Concat(Shape(A_1, start=1), ..., axis=0)          # (n,) int64: the ranks, symbolic
        h_1, ..., h_n = Split(H, sizes, axis=-1)

    A are graph inputs with symbolic ranks, so the concatenation and the split sizes are computed in the
    graph. The B side stays per module (`h_k·B_k` then the module's own Add). n heavy `x·A` kernels become
    one, at the price of n + 3 light nodes (Concat, Shape x n, Concat, Split); whether that is a win is
    measured in tools/bench_passes.py. LoRA input names, shapes and defaults are untouched.
    """

    def __init__(self):
        super().__init__()
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups: dict[int, list] = {}
        for br in find_branches(model):
            groups.setdefault(id(br.x), []).append(br)
        modified = False
        self.notes = []
        for group in groups.values():
            if len(group) < 2 or len({b.a.dtype for b in group}) != 1:
                continue
            group.sort(key=lambda b: b.path)
            x = group[0].x
            tag = group[0].path + ".lora_fused"
            concat_a = ir.node("Concat", [b.a for b in group], attributes={"axis": 1}, name=f"{tag}/concat_A")
            concat_a.outputs[0].name = f"{tag}.A_cat"
            matmul = ir.node("MatMul", [x, concat_a.outputs[0]], name=f"{tag}/matmul")
            matmul.outputs[0].name = f"{tag}.h"
            shapes = []
            for k, b in enumerate(group):
                shape = ir.node("Shape", [b.a], attributes={"start": 1, "end": 2}, name=f"{tag}/rank_{k}")
                shape.outputs[0].name = f"{tag}.rank_{k}"
                shapes.append(shape)
            sizes = ir.node("Concat", [s.outputs[0] for s in shapes], attributes={"axis": 0}, name=f"{tag}/ranks")
            sizes.outputs[0].name = f"{tag}.ranks"
            split = ir.node(
                "Split",
                [matmul.outputs[0], sizes.outputs[0]],
                attributes={"axis": -1},
                num_outputs=len(group),
                name=f"{tag}/split",
            )
            for k, (b, out) in enumerate(zip(group, split.outputs)):
                out.name = f"{tag}.h_{k}"
                out.dtype = b.mm_a.outputs[0].dtype
            anchor = min((b.mm_a for b in group), key=lambda n: list(graph).index(n))
            graph.insert_before(anchor, [concat_a, matmul, *shapes, sizes, split])
            for b, out in zip(group, split.outputs):
                ir.convenience.replace_all_uses_with(b.mm_a.outputs[0], out)
                graph.remove(b.mm_a, safe=True)
            self.notes.append(f"fused x·A of {', '.join(b.path for b in group)}")
            modified = True
        return ir.passes.PassResult(model, modified=modified)

"""What every pass must preserve, and how to find LoRA branches in a graph (shared by the passes).

The contract (names from `lora_export.contract`): each LoRA graph input (the A/B tensors of either layout
and the bank's adapter index) keeps its name, dtype and shape (symbolic rank dims included), stays a
distinct graph input (never merged with another tensor holding equal values, such as the all-zero
defaults), keeps its same-name default initializer unchanged, and is still read by some node. Base weights
(initializers named by module path, e.g. `transformer.h.0.attn.c_attn.weight`, which a TensorRT refit
addresses) keep their names and shapes.

`snapshot(model)` records this; `check_preserved(snapshot, model, ...)` raises `ContractError` listing every
violation. Every pass derives from `LoraPass`, whose onnx-ir `requires` / `ensures` hooks take the snapshot
before the pass and check it after, with the allowances the pass declares (a bake removes the LoRA inputs
and changes weights; float16 changes weight dtypes).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lora_export.contract import ADAPTER_INDEX, WEIGHT, A, is_lora_input, parse, weight_names

AUTO_NAME_RE = re.compile(r"^(val_\d+|.*/.*|[a-z_]+(_\d+)?)$")  # exporter-generated constants, not parameters


class ContractError(ir.passes.PostconditionError, AssertionError):
    """A pass broke the LoRA tensor name contract or renamed a base weight."""


def lora_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if is_lora_input(v.name)]


def is_base_weight(name: str) -> bool:
    """A parameter named by its module path (`a.b.weight`), as opposed to `val_12` or `view_7/shape`."""
    return "." in name and not is_lora_input(name) and AUTO_NAME_RE.match(name) is None


def base_weights(model: ir.Model) -> dict[str, ir.Value]:
    return {k: v for k, v in model.graph.initializers.items() if is_base_weight(k)}


def protected_names(model: ir.Model) -> set[str]:
    """Names no pass may fold, rename or deduplicate: LoRA inputs and base weights."""
    return {v.name for v in lora_inputs(model)} | set(base_weights(model))


def _dims(shape: ir.Shape | None) -> tuple:
    if shape is None:
        return ()
    return tuple(d if isinstance(d, int) else f"sym:{d.value}" for d in shape)


def _digest(value: ir.Value) -> str:
    t = value.const_value
    if t is None:
        return ""
    arr = t.numpy()
    return f"{arr.dtype}:{arr.shape}:" + hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


@dataclass
class Snapshot:
    lora: dict[str, dict] = field(default_factory=dict)  # name -> {dtype, shape, default}
    weights: dict[str, dict] = field(default_factory=dict)  # name -> {dtype, shape, digest}


def snapshot(model: ir.Model) -> Snapshot:
    snap = Snapshot()
    for v in lora_inputs(model):
        default = model.graph.initializers.get(v.name)
        snap.lora[v.name] = {
            "dtype": v.dtype,
            "shape": _dims(v.shape),
            "default": _digest(default) if default is not None else None,
        }
    for name, v in base_weights(model).items():
        if not v.uses() and not v.is_graph_output():
            continue  # an unused parameter: dead-code removal may drop it
        snap.weights[name] = {"dtype": v.dtype, "shape": _dims(v.shape), "digest": _digest(v)}
    return snap


def check_preserved(
    before: Snapshot,
    model: ir.Model,
    *,
    lora_removed: bool = False,
    weights_changed: bool = False,
    dtype_changed: bool = False,
    base_renamed: bool = False,
) -> None:
    """Raise `ContractError` if `model` lost, renamed, reshaped or merged a LoRA input or a base weight.

    `lora_removed` (bake): the LoRA inputs may be gone, but all of them or none. `weights_changed` (bake):
    base weight values may differ. `dtype_changed` (fp16): base weight dtypes may differ. `base_renamed`
    (quantization): base weights may be repacked under new names; only the LoRA inputs are checked.
    """
    problems: list[str] = []
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    present = [n for n in before.lora if n in inputs]
    if lora_removed and not present:
        pass
    else:
        if lora_removed and len(present) != len(before.lora):
            problems.append(f"only {len(present)} of {len(before.lora)} LoRA inputs were removed")
        for name, info in before.lora.items():
            v = inputs.get(name)
            if v is None:
                problems.append(f"LoRA input {name} is gone")
                continue
            if v.dtype != info["dtype"]:
                problems.append(f"LoRA input {name} changed dtype {info['dtype']} -> {v.dtype}")
            if _dims(v.shape) != info["shape"]:
                problems.append(f"LoRA input {name} changed shape {info['shape']} -> {_dims(v.shape)}")
            if not v.uses():
                problems.append(f"LoRA input {name} is no longer read by any node")
            default = graph.initializers.get(name)
            if info["default"] is not None:
                if default is None:
                    problems.append(f"LoRA input {name} lost its default initializer")
                elif default is not v:
                    problems.append(f"LoRA input {name}: its default initializer is a different value")
                elif _digest(default) != info["default"]:
                    problems.append(f"LoRA input {name}: default initializer changed")
        ids = [id(inputs[n]) for n in present]
        if len(set(ids)) != len(ids):
            problems.append("two LoRA inputs were merged into one value")
    for name, info in ({} if base_renamed else before.weights).items():
        v = graph.initializers.get(name)
        if v is None:
            problems.append(f"base weight {name} was renamed or folded away")
            continue
        if _dims(v.shape) != info["shape"]:
            problems.append(f"base weight {name} changed shape {info['shape']} -> {_dims(v.shape)}")
        if v.dtype != info["dtype"] and not dtype_changed:
            problems.append(f"base weight {name} changed dtype {info['dtype']} -> {v.dtype}")
        if not weights_changed and v.dtype == info["dtype"] and _digest(v) != info["digest"]:
            problems.append(f"base weight {name} changed value")
    if problems:
        more = f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ContractError("; ".join(problems[:6]) + more)


class LoraPass(ir.passes.PassBase):
    """A pass that keeps the LoRA contract: `requires` snapshots the input graph, `ensures` checks the result
    against it (`check_preserved`), so the check runs wherever the pass runs, in the pipeline or alone.

    Subclasses declare what they may change: `lora_removed` (the LoRA inputs may be gone, all of them or
    none), `weights_changed` (base weight values), `dtype_changed` (base weight dtypes), `base_renamed`
    (base weights repacked under new names, as quantization does). Mix in before `ir.passes.InPlacePass` /
    `FunctionalPass`.
    """

    lora_removed = False
    weights_changed = False
    dtype_changed = False
    base_renamed = False

    def requires(self, model: ir.Model) -> None:
        self._before = snapshot(model)

    def ensures(self, model: ir.Model) -> None:
        before, self._before = self._before, None
        check_preserved(
            before,
            model,
            lora_removed=self.lora_removed,
            weights_changed=self.weights_changed,
            dtype_changed=self.dtype_changed,
            base_renamed=self.base_renamed,
        )


# -- finding branches -------------------------------------------------------------------------------------------


@dataclass
class Branch:
    """`join = Add(base, MatMul(MatMul(x, A), B))` for one module of an `inputs`-layout graph."""

    path: str
    a: ir.Value
    b: ir.Value
    x: ir.Value
    mm_a: ir.Node
    mm_b: ir.Node
    join: ir.Node | None
    base: ir.Value | None


def single_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


def find_branches(model: ir.Model) -> list[Branch]:
    """LoRA branches of an `inputs`-layout graph, in graph-input order."""
    inputs = {v.name: v for v in model.graph.inputs}
    branches = []
    for v in model.graph.inputs:
        name = parse(v.name)
        if name is None or name.ab != A or name.kind != WEIGHT:
            continue
        b = inputs.get(weight_names(name.path)[1])
        if b is None:
            continue
        for node, idx in v.uses():
            if node.op_type != "MatMul" or idx != 1 or node.domain != "":
                continue
            h = node.outputs[0]
            mm_b = next(
                (u for u, i in h.uses() if u.op_type == "MatMul" and i == 0 and u.inputs[1] is b),
                None,
            )
            if mm_b is None:
                continue
            join, base = None, None
            user = single_use(mm_b.outputs[0])
            if user is not None and user.op_type == "Add":
                join = user
                base = user.inputs[0] if user.inputs[1] is mm_b.outputs[0] else user.inputs[1]
            branches.append(Branch(name.path, v, b, node.inputs[0], node, mm_b, join, base))
    return branches


def count_ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def lora_node_count(model: ir.Model) -> dict[str, int]:
    """Nodes that compute LoRA branches: forward from the LoRA inputs up to (excluding) the joining Add."""
    region = lora_region(model)
    matmuls = sum(1 for n in region if n.op_type in ("MatMul", "Gemm"))
    return {"nodes": len(region), "matmuls": matmuls}


def lora_region(model: ir.Model) -> set[ir.Node]:
    """Forward closure of the LoRA inputs, stopping at the Add/Sub that joins a branch to the base path."""
    seeds = [v for v in lora_inputs(model) if v.name != ADAPTER_INDEX]
    region: set[ir.Node] = set()
    reached: set[int] = {id(v) for v in seeds}
    stack = list(seeds)
    while stack:
        value = stack.pop()
        for node, _ in value.uses():
            if node in region:
                continue
            if node.op_type in ("Add", "Sub") and not all(i is None or id(i) in reached for i in node.inputs):
                continue  # the join: base + branch
            region.add(node)
            for out in node.outputs:
                if out.dtype is not None and not out.dtype.is_floating_point():
                    continue  # Shape(A) and friends: integer side paths do not carry the branch
                if id(out) not in reached:
                    reached.add(id(out))
                    stack.append(out)
    return region

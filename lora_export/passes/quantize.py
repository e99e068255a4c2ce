"""`QuantizeBasePass`: an int8 or int4 base model under float LoRA branches (ONNX Runtime's quantizers).

Schemes:

- `int8`: dynamic quantization (`onnxruntime.quantization.quantize_dynamic`): 8-bit weights per output
  channel, activations quantized per call with one scale per tensor; ONNX Runtime runs
  `DynamicQuantizeMatMul`. Weights are uint8 (U8U8), not int8: on x86 CPUs without VNNI (AVX2 only) ONNX
  Runtime's U8S8 kernel saturates its pairwise products (VPMADDUBSW), which took a GPT-2 logits cosine to
  0.9955 on an AVX2-only EPYC where U8U8 keeps > 0.999; U8U8 does not saturate on any CPU. Fast for prompts
  and single tokens alike (CPU: ~0.4x fp32 per MatMul).
- `int8-block`: weight-only int8 in blocks of `block_size` input rows (`MatMulNBits`, bits 8); activations
  are quantized per block inside the kernel, so accuracy is much closer to float32 (pretrained MiniLM
  sentence embeddings: cosine 0.9995 vs 0.991 for `int8`). ONNX Runtime 1.32's CPU kernel is fast for
  single-token steps (~0.12x fp32 per MatMul) but slower than float32 for many rows at once (~1.7x).
- `int4`: weight-only, `MatMulNBits` bits 4, one scale per `block_size` input rows
  (`onnxruntime.quantization.matmul_nbits_quantizer`), symmetric. Same speed profile as `int8-block`.

`accuracy_level` 4 lets the MatMulNBits CPU kernel compute with int8 activations (the fast path); 0 keeps
float activations.

Only base MatMul weights are quantized. Every node of the LoRA region (the branch nodes fed by the LoRA
inputs, and the Add joining each branch to its base output, see `transformer_fusion.guarded_nodes`) is passed
to the quantizer by name as excluded, so adapters still load, swap and mix per row in float32, and the
LoRA inputs with their defaults are unchanged. Before quantizing, base weights read through a
`Transpose` (nn.Linear) are stored transposed, and `Gemm` nodes become `MatMul` (+ bias `Add`), because the
quantizers only take a MatMul whose B is an initializer. So base weights are renamed and repacked: a
quantized graph cannot be baked or refit by weight name; those commands ask for the unquantized graph.

`summary` says what was done (scheme, block size, quantized nodes and weights, excluded LoRA nodes) and is
recorded in the manifest by the pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lora_export.contract import is_lora_input
from lora_export.errors import UserError
from lora_export.passes.contract import LoraPass, check_preserved, snapshot

SCHEMES = ("int8", "int8-block", "int4")
BLOCKWISE = ("int8-block", "int4")  # MatMulNBits schemes: --block-size applies
BLOCK_SIZES = (16, 32, 64, 128, 256)
# ops that only a quantized graph holds: a second --quantize is refused
QUANTIZED_OPS = {
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "QLinearMatMul",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
    "GatherBlockQuantized",
    "QGemm",
}


def check_scheme(scheme: str | None, block_size: int | None = None) -> None:
    if scheme is not None and scheme not in SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise UserError(f"--block-size {block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if block_size is not None and scheme not in BLOCKWISE:
        raise UserError(f"--block-size applies to --quantize {' or '.join(BLOCKWISE)} only")


def _nodes(model):
    if isinstance(model, ir.Model):
        return list(ir.traversal.RecursiveGraphIterator(model.graph))
    return list(model.graph.node)


def _int_attr(node, name: str) -> int | None:
    """An int attribute of an onnx-ir node or an onnx NodeProto (None when absent)."""
    if isinstance(node, ir.Node):
        a = node.attributes.get(name)
        return None if a is None else int(a.value)
    return next((int(a.i) for a in node.attribute if a.name == name), None)


def quantized_ops(model) -> dict[str, int]:
    """Quantized op types in `model` (an `ir.Model` or an `onnx.ModelProto`; empty for a float graph)."""
    out: dict[str, int] = {}
    for op in (n.op_type for n in _nodes(model)):
        if op in QUANTIZED_OPS:
            out[op] = out.get(op, 0) + 1
    return out


def scheme_of(model) -> str | None:
    """`int4`, `int8` or None (float), from the ops of `model` (`ir.Model` or `onnx.ModelProto`)."""
    ops = quantized_ops(model)
    if not ops:
        return None
    if "MatMulNBits" in ops:
        bits = {_int_attr(n, "bits") for n in _nodes(model) if n.op_type == "MatMulNBits"}
        return "int8-block" if bits == {8} else "int4"
    return "int8"


def graph_scheme(path) -> str | None:
    """`scheme_of` for a graph file (weights are not read)."""
    import onnx

    return scheme_of(onnx.load(str(path), load_external_data=False))


def refuse_quantized(model, what: str) -> None:
    """One-line UserError when `what` (bake, a TensorRT refit, ...) is asked of a quantized graph
    (`ir.Model` or `onnx.ModelProto`)."""
    ops = quantized_ops(model)
    if ops:
        raise UserError(
            f"{what} needs the unquantized graph: this one is quantized ({', '.join(sorted(ops))}), its base "
            "weights are renamed and repacked; run it on the graph from before `optimize --quantize`"
        )


class QuantizeBasePass(LoraPass, ir.passes.FunctionalPass):
    """See the module docstring. The LoRA inputs, their defaults and readers are checked as for every pass;
    base weights are exempt (`base_renamed`)."""

    base_renamed = True

    def __init__(self, scheme: str, *, block_size: int | None = None, accuracy_level: int = 4):
        super().__init__()
        check_scheme(scheme, block_size)
        self.scheme = scheme
        self.block_size = block_size or 32
        self.accuracy_level = accuracy_level
        self.summary: dict[str, Any] = {}
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from lora_export.passes.transformer_fusion import guarded_nodes

        ops = quantized_ops(model)
        if ops:
            raise UserError(
                f"the graph is already quantized ({', '.join(sorted(ops))}): quantize the float graph instead"
            )
        before = snapshot(model)
        bytes_before = _init_bytes(model)
        model = model.clone()
        _name_nodes(model)
        lora_nodes = sorted(n.name for n in guarded_nodes(model))
        prepared = _prepare_weights(model, {id(n) for n in guarded_nodes(model)})
        weights_before = set(model.graph.initializers)
        # weights in an external data file are read into memory: ORT's quantizers work in their own temp dirs
        ir.external_data.load_to_model(model)
        proto = ir.serde.serialize_model(model)
        with _quiet():
            if self.scheme == "int8":
                proto = _int8(proto, lora_nodes)
            else:
                bits = 4 if self.scheme == "int4" else 8
                proto = _nbits(proto, lora_nodes, bits, self.block_size, self.accuracy_level)
        new = ir.serde.deserialize_model(proto)
        _restore_lora_defaults(model, new)
        check_preserved(before, new, base_renamed=True)  # LoRA inputs, defaults and readers: exactly as before
        self._summarize(model, new, lora_nodes, prepared, weights_before, bytes_before)
        return ir.passes.PassResult(new, modified=True)

    def _summarize(self, old: ir.Model, new: ir.Model, lora_nodes, prepared, weights_before, bytes_before) -> None:
        old_nodes = {n.name: n for n in old.graph}
        new_names = {n.name for n in new.graph}
        quantized_nodes = sorted(
            name for name, n in old_nodes.items() if n.op_type == "MatMul" and name not in new_names
        )
        gone = sorted(k for k in weights_before if k not in new.graph.initializers)
        touched_lora = [n for n in lora_nodes if n not in new_names]
        if touched_lora:  # the quantizer was told to exclude them: a bug if any changed
            raise AssertionError(f"LoRA nodes were quantized: {touched_lora[:3]}")
        self.summary = {
            "scheme": self.scheme,
            "method": "dynamic: uint8 weights per output channel, activations per tensor (quantize_dynamic, U8U8)"
            if self.scheme == "int8"
            else f"weight-only {self.scheme} MatMulNBits, symmetric, accuracy_level {self.accuracy_level}",
            "block_size": self.block_size if self.scheme in BLOCKWISE else None,
            "nodes_quantized": len(quantized_nodes),
            "quantized_nodes": quantized_nodes,
            "weights_quantized": gone,
            "weights_prepared": prepared,
            "lora_nodes_kept_float": len(lora_nodes),
            "quantized_ops": quantized_ops(new),
            "initializer_bytes": {"before": bytes_before, "after": _init_bytes(new)},
        }
        self.notes.append(
            f"quantized {len(quantized_nodes)} MatMul(s) to {self.scheme}"
            + (f" (block size {self.block_size})" if self.scheme in BLOCKWISE else "")
            + f"; {len(lora_nodes)} LoRA node(s) kept float"
        )


def _init_bytes(model: ir.Model) -> int:
    return int(sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None))


def _name_nodes(model: ir.Model) -> None:
    """Every node gets a unique name: the quantizers take exclusions by node name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _prepare_weights(model: ir.Model, guarded: set[int]) -> list[str]:
    """MatMul/Gemm nodes outside the LoRA region get their weight as a plain `[in, out]` initializer:
    `MatMul(x, Transpose(W))` -> `MatMul(x, W.T)`, `Gemm(x, W, [c])` -> `MatMul(x, W^(T)) [+ c]`."""
    graph = model.graph
    prepared: list[str] = []
    for node in list(graph):
        if id(node) in guarded or node.domain != "":
            continue
        if node.op_type == "MatMul":
            w = _plain_weight(model, node.inputs[1])
            if w is not None:
                node.replace_input_with(1, w)
                prepared.append(w.name)
        elif node.op_type == "Gemm":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
            w = node.inputs[1]
            if w is None or not _is_weight(w):
                continue
            if attrs.get("transB", 0):
                w = _transposed(model, w)
            matmul = ir.node("MatMul", [node.inputs[0], w], name=f"{node.name}/MatMul")
            out = matmul.outputs[0]
            out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
            new_nodes = [matmul]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                add = ir.node("Add", [out, node.inputs[2]], name=f"{node.name}/Add")
                add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
                new_nodes.append(add)
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], new_nodes, node.outputs, [new_nodes[-1].outputs[0]]
            )
            prepared.append(w.name)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return sorted(set(prepared))


def _is_weight(v: ir.Value) -> bool:
    return v.is_initializer() and not v.is_graph_input() and v.const_value is not None and not is_lora_input(v.name)


def _plain_weight(model: ir.Model, b: ir.Value | None) -> ir.Value | None:
    if b is None:
        return None
    producer = b.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain != "":
        return None
    perm = producer.attributes.get("perm")
    w = producer.inputs[0]
    if perm is None or list(perm.value) != [1, 0] or w is None or not _is_weight(w) or len(w.shape) != 2:
        return None
    return _transposed(model, w)


def _transposed(model: ir.Model, w: ir.Value) -> ir.Value:
    name = f"{w.name}.T"
    existing = model.graph.initializers.get(name)
    if existing is not None:
        return existing
    arr = np.ascontiguousarray(w.const_value.numpy().T)
    value = ir.Value(
        name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(w.dtype), const_value=ir.tensor(arr, name=name)
    )
    model.graph.register_initializer(value)
    return value


def _int8(proto, exclude: list[str]):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="lora_quant_") as tmp:
        out = Path(tmp) / "q.onnx"
        large = proto.ByteSize() > 1_800_000_000
        quantize_dynamic(
            proto,
            out,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QUInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=large,
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load(str(out))


def _nbits(proto, exclude: list[str], bits: int, block_size: int, accuracy_level: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(
        proto,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul",),
    )
    q.process()
    return q.model.model


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizers log every node at INFO and warn about pre-processing: keep the CLI clean."""
    loggers = [logging.getLogger(n) for n in ("", "onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _restore_lora_defaults(old: ir.Model, new: ir.Model) -> None:
    """Put back any LoRA default initializer a quantizer dropped from the graph's initializers."""
    inputs = {v.name: v for v in new.graph.inputs}
    for name, v in old.graph.initializers.items():
        if not is_lora_input(name) or name in new.graph.initializers or name not in inputs:
            continue
        target = inputs[name]
        target.const_value = v.const_value
        new.graph.register_initializer(target)

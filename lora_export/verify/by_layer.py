"""Verify a model that does not fit in memory: both sides run one piece of the model at a time.

- PyTorch (`jit_module`): the lazily loaded skeleton with every parameter read from the checkpoint just before
  its module's forward and dropped right after it (forward hooks); between calls a parameter is an unwritten
  placeholder (`torch.empty`: address space, no resident pages), so PEFT wraps and swaps adapters on it as on
  any model (its LoRA tensors are real and stay). Peak: the largest module's weights, in float32.
- ONNX Runtime (`SegmentedGraph`): the graph's nodes, in their (topological) order, cut into consecutive
  pieces holding at most `budget` bytes of initializers; each piece is its own session whose initializers
  point into the graph's own external data file (nothing copied), opened, run and released in turn. The
  values a later piece needs (activations, masks) are carried between pieces.

Outputs are then compared as in a whole-model verify (`check.verify_backends`); the report's `method` says
which way it ran. `needs_by_layer` decides when to (the weights would not fit in the memory available).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_export.artifacts.memory import release_freed_memory
from lora_export.errors import UserError
from lora_export.models.loading import LoadedModel

SEGMENT_BYTES = 512 << 20  # initializer bytes per ONNX piece (a piece with one larger tensor holds just it)
HEADROOM = 1.25  # a whole-model verify needs about this times the weight bytes, plus the interpreter
INTERPRETER_BYTES = 1 << 30
JIT_ATTR = "_lora_export_jit"  # on a module: {parameter attr: (checkpoint name, placeholder)}
WHOLE = "whole model, one backend at a time (PyTorch, then ONNX Runtime)"
BY_LAYER = "by layer: PyTorch module by module from the checkpoint, ONNX Runtime in pieces of <= {mb} MB"


def describe(by_layer: bool) -> str:
    """The report's `method` line."""
    return BY_LAYER.format(mb=SEGMENT_BYTES >> 20) if by_layer else WHOLE


def graph_weight_bytes(header) -> int:
    """Bytes of a graph's initializers (external ones by their recorded length), from its header only."""
    return sum(_tensor_bytes(t) for t in header.graph.initializer)


def needs_by_layer(weight_bytes: int, available: int | None = None) -> bool:
    """True when a whole-model verify would not fit in the memory available now (unknown: it is assumed to)."""
    available = available if available is not None else available_memory()
    return available is not None and weight_bytes * HEADROOM + INTERPRETER_BYTES > available


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (Linux `MemAvailable`, else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_streamable(loaded: LoadedModel) -> None:
    if loaded.checkpoint is None:
        raise UserError(
            f"{loaded.source}: a by-layer verify reads the weights from a model directory's safetensors files; "
            "give a transformers model directory (or verify the whole model)"
        )


# -- PyTorch: each module's weights just in time ------------------------------------------------------------


def jit_module(loaded: LoadedModel) -> nn.Module:
    """A private module tree of the lazily loaded `loaded` whose parameters are read from its checkpoint at
    each forward of their module (float32) and released after it."""
    from lora_export.artifacts.checkpoint import SafetensorsWeights
    from lora_export.models.skeleton import tensor_names

    check_streamable(loaded)
    module = copy.deepcopy(loaded.module)  # meta parameters: nothing to copy; buffers are small
    source = SafetensorsWeights(loaded.checkpoint)
    names, keys = tensor_names(module), source.keys()

    def load(owner: nn.Module, args) -> None:  # the module's parameters, read now (float32)
        for attr, (key, _) in getattr(owner, JIT_ATTR).items():
            owner._parameters[attr] = nn.Parameter(source.read(key).float(), requires_grad=False)

    def release(owner: nn.Module, args, out) -> None:  # back to the placeholders: the weights are freed
        for attr, (_, placeholder) in getattr(owner, JIT_ATTR).items():
            owner._parameters[attr] = placeholder
        release_freed_memory()

    # hooks find their parameters through the module (JIT_ATTR), so a copy of the tree (a runner's own module
    # tree over the same tensors) keeps working
    placeholders: dict[int, tuple[str, nn.Parameter]] = {}  # id(meta parameter) -> (checkpoint name, placeholder)
    for owner in module.modules():
        for attr, p in list(owner._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in placeholders:  # tied parameters: one placeholder, read under one of their names
                key = next((n for n in names[id(p)] if n in keys), None)
                if key is None:
                    raise UserError(f"{loaded.source}: the checkpoint has no tensor {names[id(p)][0]}")
                placeholders[id(p)] = (key, nn.Parameter(torch.empty(p.shape, dtype=torch.float32), False))
            owner._parameters[attr] = placeholders[id(p)][1]
            if not hasattr(owner, JIT_ATTR):
                setattr(owner, JIT_ATTR, {})
                owner.register_forward_pre_hook(load)
                owner.register_forward_hook(release)
            getattr(owner, JIT_ATTR)[attr] = placeholders[id(p)]
    module.weight_reads = source.reads  # for tests: how often each checkpoint tensor was read
    return module.float().eval()


# -- ONNX Runtime: the graph in pieces -----------------------------------------------------------------------


class SegmentedGraph:
    """Runs an ONNX graph piece by piece (see the module docstring); `infer` as `OrtRunner.infer`."""

    name = "ort"

    def __init__(self, path: str | Path, providers: list[str] | None = None, budget: int | None = None):
        self.path, self.providers, self.budget = Path(path), providers, budget or SEGMENT_BYTES
        self.session = None  # no whole-graph session: GraphSide takes slots and precision from the header

    def __enter__(self) -> SegmentedGraph:
        import onnx

        from lora_export.artifacts.onnxio import load_onnx_header

        header = load_onnx_header(self.path)
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for n in header.graph.node
            for a in n.attribute
        ):
            raise UserError(f"{self.path} has control-flow subgraphs: verify it whole (without --by-layer)")
        self.inputs = [i.name for i in header.graph.input]
        self.outputs = [o.name for o in header.graph.output]
        self.half = {i.name for i in header.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
        self.pieces = _plan(self.path, header, _cut(header, self.budget))
        return self

    def __exit__(self, *exc) -> None:
        self.pieces = None

    def infer(self, feeds: dict[str, np.ndarray], run_options=None) -> dict[str, np.ndarray]:
        values = {
            k: v.astype(np.float16) if k in self.half and v.dtype == np.float32 else v
            for k, v in feeds.items()
            if k in self.inputs
        }
        for piece in self.pieces:
            session = _piece_session(self, piece)
            got = session.run(piece["outs"], {n: values[n] for n in piece["ins"] if n in values}, run_options)
            del session  # its weights go with it
            release_freed_memory()
            values.update(zip(piece["outs"], got))
            values = {k: v for k, v in values.items() if k in piece["later"] or k in self.inputs}
        return {n: values[n] for n in self.outputs}


def _tensor_bytes(t) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(t.raw_data) or int(np.prod(t.dims or [1])) * 4


def _cut(header, budget: int) -> list[dict]:
    """Consecutive nodes grouped while their initializers stay within `budget` bytes."""
    inits = {t.name: t for t in header.graph.initializer}
    pieces, nodes, held, size = [], [], set(), 0
    for node in header.graph.node:
        new = {n for n in node.input if n in inits and n not in held}
        extra = sum(_tensor_bytes(inits[n]) for n in new)
        if nodes and size + extra > budget:
            pieces.append({"nodes": nodes, "inits": held})
            nodes, held, size = [], set(), 0
            new = {n for n in node.input if n in inits}
            extra = sum(_tensor_bytes(inits[n]) for n in new)
        nodes.append(node)
        held |= new
        size += extra
    if nodes:
        pieces.append({"nodes": nodes, "inits": held})
    for i, p in enumerate(pieces):
        p["index"] = i
        p["produced"] = {o for n in p["nodes"] for o in n.output if o}
        p["used"] = {x for n in p["nodes"] for x in n.input if x}
    return pieces


def _plan(path: Path, header, pieces: list[dict]) -> list[dict]:
    """Each piece's inputs (`ins`: graph inputs and values earlier pieces make), outputs (`outs`: what later
    pieces or the graph's outputs need), the values to keep after it (`later`), and its serialized model."""
    graph_inputs = {i.name for i in header.graph.input}
    types = _value_types(header)
    later = {o.name for o in header.graph.output}
    for piece in reversed(pieces):  # what is needed after each piece: the graph's outputs and later pieces' inputs
        piece["later"] = set(later)
        later |= piece["used"]
    made: set[str] = set()
    for piece in pieces:
        piece["ins"] = sorted(
            n for n in piece["used"] - piece["produced"] if n not in piece["inits"] or n in graph_inputs
        )
        missing = [n for n in piece["ins"] if n not in made and n not in graph_inputs]
        if missing:
            raise UserError(f"a piece of the graph needs {missing[0]}, which no earlier piece makes: verify it whole")
        piece["outs"] = sorted(piece["produced"] & piece["later"])
        piece["model"] = _piece_model(path, header, types, piece)
        made |= piece["produced"]
    return pieces


def _value_types(header) -> dict:
    import onnx

    known = {v.name: v for v in [*header.graph.input, *header.graph.output, *header.graph.value_info]}
    if all(o in known for n in header.graph.node for o in n.output if o):
        return known
    inferred = onnx.shape_inference.infer_shapes(header)
    known.update({v.name: v for v in inferred.graph.value_info})
    return known


def _piece_model(path: Path, header, types: dict, piece: dict) -> bytes:
    """A piece as its own model, serialized; its initializers keep their references into the graph's data file."""
    import onnx

    def info(name: str):
        if name not in types:
            raise UserError(f"{path}: no type recorded for {name}; verify it whole (without --by-layer)")
        return types[name]

    inits = [t for t in header.graph.initializer if t.name in piece["inits"]]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            piece["nodes"], f"piece{piece['index']}", [info(n) for n in piece["ins"]],
            [info(n) for n in piece["outs"]], inits,
        ),
        opset_imports=header.opset_import,
        ir_version=header.ir_version,
    )  # fmt: skip
    model.functions.extend(header.functions)
    return model.SerializeToString()


def _piece_session(graph: SegmentedGraph, piece: dict):
    import onnxruntime as ort

    from lora_export.backends.onnxrt import session_options

    opts = session_options()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.path.parent))
    try:
        return ort.InferenceSession(
            piece["model"], sess_options=opts, providers=graph.providers or ["CPUExecutionProvider"]
        )
    except Exception as e:  # ORT's own exception types
        raise UserError(
            f"ONNX Runtime cannot run piece {piece['index']} of {graph.path}: {str(e).splitlines()[0][:300]}"
        ) from None

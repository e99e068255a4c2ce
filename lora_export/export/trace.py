"""The one torch.onnx.export call every export goes through, and the name-preserving cleanup after it.

The dynamo exporter's own optimizer constant-folds `Transpose(W)` into new tensors named `val_N`, which
loses the weight names that adapters and TensorRT refit address. So we export with `optimize=False`
and run onnxscript's optimizer ourselves with folding disabled for any node that reads a parameter or
a LoRA input; ONNX Runtime folds those transposes at session start anyway, so nothing is lost at run time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from torch import nn

from lora_export.adapters.layer import BranchFeed
from lora_export.artifacts import onnxio
from lora_export.artifacts.fileio import io_errors
from lora_export.artifacts.memory import release_freed_memory
from lora_export.contract import ADAPTER_INDEX, BANK_KIND, A, is_rank_dim, parse
from lora_export.errors import UserError
from lora_export.export.names import rename_initializers
from lora_export.export.stream import OnWrite, StreamPlan
from lora_export.models.loading import LoadedModel, call_model

FX_NODE_KEY = "pkg.torch.onnx.fx_node"


@dataclass
class ExtraInput:
    """A graph input beyond the model's own (LoRA tensors, the bank's adapter index)."""

    name: str
    example: torch.Tensor
    dynamic: dict[int, str] = field(default_factory=dict)
    default: torch.Tensor | None = None  # becomes a same-name initializer (the input's default value)


class ExportWrapper(nn.Module):
    """Positional forward over the model's named inputs plus the extra (LoRA) inputs."""

    def __init__(self, loaded: LoadedModel, extra: list[ExtraInput], feed: BranchFeed | None):
        super().__init__()
        self.model = loaded.module
        self._loaded = loaded
        self._extra_names = [e.name for e in extra]
        self._feed = feed

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(self._loaded.input_names)
        feeds = dict(zip(self._loaded.input_names, args[:n]))
        if self._feed is not None:
            extra = dict(zip(self._extra_names, args[n:]))
            index = extra.pop(ADAPTER_INDEX, None)
            self._feed.tensors = extra
            if index is not None:
                self._feed.index = index
                self._feed.slot_mask = bank_slot_mask(index, extra, self._feed)
        try:
            return call_model(self._loaded, feeds)
        finally:
            if self._feed is not None:
                self._feed.tensors, self._feed.slot_mask, self._feed.index = {}, None, None


def bank_slot_mask(index: torch.Tensor, tensors: dict[str, torch.Tensor], feed: BranchFeed) -> torch.Tensor | None:
    """`[batch, N*R]`: 1 where rank slot j belongs to the row's adapter (j // R == index); -1 matches none."""
    a_bank = next((t for k, t in tensors.items() if (p := parse(k)) and p.ab == A and p.kind == BANK_KIND), None)
    if a_bank is None:  # a bank of modules_to_save only
        return None
    n, rank = a_bank.shape[0], a_bank.shape[2]
    owner = torch.arange(n * rank, device=index.device) // rank  # (N*R,)
    return (owner.unsqueeze(0) == index.unsqueeze(1)).to(a_bank.dtype)  # (batch, N*R)


def trace(
    loaded: LoadedModel,
    *,
    extra: list[ExtraInput] | None = None,
    feed: BranchFeed | None = None,
    batch: int = 2,
    seq: int = 16,
    opset: int | None = None,
    dtype: torch.dtype = torch.float32,
    weights: StreamPlan | None = None,
) -> ir.Model:
    """Export `loaded` (with any LoRA wiring already attached) to an ONNX IR model with clean names.

    A module whose parameters are on the meta device (an export skeleton) needs `weights`, the plan that
    gives each parameter initializer its bytes, lazily (read when the graph is saved)."""
    extra = extra or []
    example = loaded.make_inputs(batch, seq or loaded.default_seq, 0)
    example = {k: v.to(dtype) if v.is_floating_point() else v for k, v in example.items()}
    wrapper = ExportWrapper(loaded, extra, feed).eval()
    args = tuple(example[n] for n in loaded.input_names) + tuple(e.example for e in extra)
    if weights is not None:  # a skeleton computes on the meta device: inputs there too, so no op mixes devices
        args = tuple(a.to("meta") for a in args)
    dims: dict[str, torch.export.Dim] = {}

    def dim_for(label: str) -> torch.export.Dim:
        if label not in dims:
            dims[label] = torch.export.Dim(_py_ident(label), min=0 if is_rank_dim(label) else 1)
        return dims[label]

    dynamic = tuple(
        {d: dim_for(lbl) for d, lbl in loaded.dynamic_axes.get(n, {}).items()} for n in loaded.input_names
    ) + tuple({d: dim_for(lbl) for d, lbl in e.dynamic.items()} for e in extra)
    program = _export(wrapper, args, loaded, extra, dynamic, opset)
    model = program.model
    got = model.opset_imports.get("")
    if opset and got != opset:
        raise UserError(
            f"--opset {opset} is not supported by this torch exporter (it produced opset {got}): choose another --opset"
        )
    _drop_stack_traces(model)
    rename_initializers(model)
    if weights is not None:
        weights.bind(model)
        _record_weights_device(model)
    _restore_dim_names(model, loaded, extra)
    protected = set(model.graph.initializers) | {e.name for e in extra}
    optimize_preserving(model, protected)
    for e in extra:
        if e.default is not None:
            _add_default(model, e.name, e.default)
    return model


def _drop_stack_traces(model: ir.Model) -> None:
    """The exporter records Python stack traces (with local file paths) on every node: keep graphs free of
    where they were built, so the same inputs give the same bytes on any machine."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


def _record_weights_device(model: ir.Model) -> None:
    """Tracing a meta-device skeleton records `device: meta` in each node's FX description; record the device
    the weights are written from (cpu), as tracing the model itself does, so the graphs are the same bytes."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        fx = node.metadata_props.get(FX_NODE_KEY)
        if fx is not None and "device: meta" in fx:
            node.metadata_props[FX_NODE_KEY] = fx.replace("device: meta", "device: cpu")


def _py_ident(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def _export(wrapper, args, loaded, extra, dynamic, opset):
    kwargs = dict(
        dynamo=True,
        optimize=False,
        input_names=loaded.input_names + [e.name for e in extra],
        output_names=loaded.output_names,
        dynamic_shapes=(dynamic,),
        verbose=False,  # forward(*args)
    )
    if opset:
        kwargs["opset_version"] = opset
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            return torch.onnx.export(wrapper, args, **kwargs)
    except Exception as e:  # the exporter fails on the user's model: one line (the cause kept for --verbose)
        raise UserError(f"torch.onnx.export cannot export {loaded.source}: {root_cause(e)}; {export_advice(e)}") from e


def export_advice(e: BaseException) -> str:
    """What to do about an exporter failure, by its cause (a device mismatch is not the model's return type)."""
    cause = root_cause(e)
    if "DeviceMismatch" in cause or "two devices" in cause or "same device" in cause:
        meta = " (meta: a weight the weightless trace never loaded, held outside the model's parameters)"
        return (
            "a tensor on another device met the traced weights"
            + (meta if "meta" in cause else "")
            + ": put every tensor the forward reads on the model's device (merge-and-export loads all weights), "
            "or rerun with --verbose for the exporter's trace"
        )
    return (
        "make the model's forward return tensors only (e.g. no cache objects: a wrapper module in a "
        "py:module:factory), or rerun with --verbose for the exporter's trace"
    )


def root_cause(e: BaseException) -> str:
    """The first line of the innermost cause of `e` (the exporter wraps the real error in its own)."""
    seen = set()
    while e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("#")]
    text = lines[0] if lines else type(e).__name__
    first = text.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {first[:300]}"


def _restore_dim_names(model: ir.Model, loaded: LoadedModel, extra: list[ExtraInput]) -> None:
    """torch names dims after its `Dim` objects (identifiers); give back the labels we chose."""
    labels = {}
    for axes in list(loaded.dynamic_axes.values()) + [e.dynamic for e in extra]:
        for lbl in axes.values():
            labels[_py_ident(lbl)] = lbl
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim(labels.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d for d in value.shape
        ]
        value.shape = ir.Shape(dims)
    for out in model.graph.outputs:  # outputs: use the labels declared for them where torch made its own
        axes = loaded.dynamic_axes.get(out.name)
        if axes and out.shape is not None:
            dims = list(out.shape)
            for d, lbl in axes.items():
                if d < len(dims) and not isinstance(dims[d], int):
                    dims[d] = ir.SymbolicDim(lbl)
            out.shape = ir.Shape(dims)


def optimize_preserving(model: ir.Model, protected: set[str]) -> None:
    """onnxscript's optimizer, never folding a node that reads a protected tensor, never deduplicating."""
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    def should_fold(node: ir.Node) -> bool | None:
        if any(v is not None and v.name in protected for v in node.inputs):
            return False
        return None

    passes = ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True, input_size_limit=8192, output_size_limit=262144, should_fold=should_fold
                ),
                rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1024),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.TopologicalSortPass(),
    )
    passes(model)


def _add_default(model: ir.Model, name: str, value: torch.Tensor) -> None:
    """A same-name initializer for a graph input: its default when the caller feeds nothing."""
    graph_input = next(v for v in model.graph.inputs if v.name == name)
    graph_input.const_value = ir.tensor(value.detach().cpu().numpy(), name=name)
    model.graph.initializers[name] = graph_input


def save(model: ir.Model, path: str | os.PathLike, *, on_write: OnWrite | None = None) -> list[Path]:
    """Write atomically (temp dir, then rename). Weights over `onnxio.EXTERNAL_DATA_THRESHOLD` go to
    `<name>.data`, written one tensor at a time (lazy tensors are evaluated there, once each);
    `on_write(bytes done, total bytes, tensor name)` follows it."""
    path = Path(path)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = size > onnxio.EXTERNAL_DATA_THRESHOLD
    with io_errors(path):
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    written: list[Path] = []

    def progress(tensor, info) -> None:
        release_freed_memory()  # the previous tensor's buffers (read, merged, serialized) go back to the OS
        if on_write is not None:
            on_write(info.offset, size, tensor.name or "")

    try:
        with io_errors(path):
            data_name = f"{path.name}.data" if external else None
            try:
                ir.save(model, tmp_dir / path.name, external_data=data_name, callback=progress)
            except Exception as e:  # a weight read while saving refused (UserError): the serializer wraps it
                cause = _user_error_in(e)
                if cause is None:
                    raise
                raise cause from None
            if on_write is not None:
                on_write(size, size, "")
            for f in sorted(tmp_dir.iterdir(), reverse=True):  # data before the graph that names it
                os.replace(f, path.parent / f.name)
                written.append(path.parent / f.name)
        return written
    except BaseException:
        for f in written:  # a data file without its graph is no output
            f.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _user_error_in(e: BaseException) -> UserError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None

"""Streamed export: trace a weightless skeleton, then write each weight once, straight into the graph file.

The tracer needs shapes, not values, so every export traces a copy of the model whose parameters and buffers
live on the meta device (`export_skeleton`), fed meta-device example inputs, so nothing mixes devices. Each
initializer of the traced graph then gets a lazy tensor (`StreamPlan.bind`) that reads its weight from a
`WeightSource` (the in-memory model itself, or the checkpoint's safetensors files; buffers, which are small,
from the model's own buffers), casts it to the export dtype, folds the
module's LoRA delta in when the export merges one (`ModuleLora.merged_with`, in float32, the one merge every
path uses), and is evaluated only when the graph is saved, one tensor at a time. So peak memory is set by
the largest tensor, not by copies of the model, and the bytes are the ones the in-memory export wrote.

Tied weights: a merged module gets its own parameter (named after the module) before tracing, so the merged
weight is written for it alone and every other user of the shared tensor keeps the base weight.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype

from lora_export.adapters.adapter import Adapter, ModuleLora
from lora_export.adapters.inject import check_fits, unwrap
from lora_export.adapters.layer import merged_tensor, stores_in_out
from lora_export.adapters.ties import is_shared
from lora_export.artifacts.checkpoint import ModuleWeights, RebuiltWeights, SafetensorsWeights, WeightSource
from lora_export.errors import UserError
from lora_export.models.loading import LoadedModel
from lora_export.models.skeleton import meta_module, meta_parameter, tensor_names

# Tensors up to this size are kept once read: the graph optimizer reads a few small ones (biases, norm
# scales) before the graph is saved, and they must not be read twice.
SMALL_TENSOR_BYTES = 1 << 20
# Room the graph file needs beyond its weights (nodes, names, shapes), as a fraction plus a floor.
DISK_MARGIN, DISK_FLOOR = 0.02, 16 << 20

OnWrite = Callable[[int, int, str], None]  # (bytes written so far, total bytes, tensor being written)


@dataclass
class Planned:
    """Where one initializer's bytes come from: a source tensor (by name, or a buffer in memory), cast to
    `dtype`, optionally merged."""

    source: str | torch.Tensor
    dtype: torch.dtype
    shape: tuple[int, ...]
    merge: tuple[ModuleLora, bool, str] | None = None  # (lora, weight stored [in, out], module path)

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


class StreamPlan:
    """The bytes of every meta tensor of an export skeleton (`{id(meta parameter or buffer): Planned}`)."""

    def __init__(self, source: WeightSource, *, allow_nonfinite: bool = False):
        self.source = source
        self.allow_nonfinite = allow_nonfinite
        self.tensors: dict[int, Planned] = {}

    def bind(self, model: ir.Model) -> int:
        """Give each initializer the exporter left as a meta tensor a lazy tensor over its source; returns
        how many. An unplanned meta initializer is a bug (its bytes would be missing)."""
        bound = 0
        for name, value in model.graph.initializers.items():
            raw = getattr(value.const_value, "raw", None)
            if not isinstance(raw, torch.Tensor) or not raw.is_meta:
                continue
            planned = self.tensors.get(id(raw))
            if planned is None:
                raise RuntimeError(f"initializer {name} has no weight source (a tensor made during tracing?)")
            value.const_value = ir.LazyTensor(
                lambda name=name, planned=planned: TorchTensor(self.materialize(planned), name=name),
                dtype=from_torch_dtype(planned.dtype),
                shape=ir.Shape(planned.shape),
                cache=planned.nbytes <= SMALL_TENSOR_BYTES,
                name=name,
            )
            bound += 1
        return bound

    def materialize(self, planned: Planned) -> torch.Tensor:
        """Read, cast, merge: the initializer's values (freed once written)."""
        if isinstance(planned.source, torch.Tensor):
            return planned.source.detach().to(planned.dtype).contiguous()
        tensor = self.source.read(planned.source)
        _check_shape(planned.source, tuple(tensor.shape), planned.shape)
        tensor = tensor.to(planned.dtype)
        if planned.merge is not None:
            lora, in_out, path = planned.merge
            tensor = merged_tensor(tensor, lora, in_out=in_out, allow_nonfinite=self.allow_nonfinite, path=path)
        return tensor.contiguous()

    def weight_bytes(self, module: torch.nn.Module) -> int:
        """Bytes of the parameters and buffers `module` holds now (what its graph will store)."""
        held = {id(t): t for t in [*module.parameters(), *module.buffers()]}
        return sum(self.tensors[i].nbytes for i in held if i in self.tensors)


def weight_source(loaded: LoadedModel) -> WeightSource:
    """The checkpoint's safetensors for a lazily loaded model (or the model it rebuilds, once the first weight
    is read), else the model's own tensors."""
    if loaded.checkpoint is not None:
        return SafetensorsWeights(loaded.checkpoint)
    if loaded.rebuild is not None:
        return RebuiltWeights(loaded.module, lambda: loaded.materialized().module)
    return ModuleWeights(loaded.module)


def export_skeleton(
    loaded: LoadedModel, dtype: torch.dtype, *, allow_nonfinite: bool = False
) -> tuple[LoadedModel, StreamPlan]:
    """A private, weightless copy of `loaded` cast to `dtype`, and the plan that streams its weights."""
    source = weight_source(loaded)
    base = loaded.module
    names = tensor_names(base)
    keys = source.keys()
    module, origin = meta_module(base, dtype)
    plan = StreamPlan(source, allow_nonfinite=allow_nonfinite)
    for t in [*module.parameters(), *module.buffers()]:
        orig = origin[id(t)]
        if not orig.is_meta and not isinstance(orig, torch.nn.Parameter):  # a buffer, small: the model's own
            plan.tensors[id(t)] = Planned(orig, t.dtype, tuple(t.shape))
            continue
        aliases = names[id(orig)]
        found = next((n for n in aliases if n in keys), None)
        if found is None:
            raise UserError(
                f"{loaded.source}: the checkpoint has no tensor {aliases[0]}: is it a checkpoint of this model?"
            )
        _check_shape(found, source.shape(found), tuple(t.shape))
        plan.tensors[id(t)] = Planned(found, t.dtype, tuple(t.shape))
    work = copy.copy(loaded)
    work.module = module.eval()
    work.checkpoint = None
    work.rebuild = None
    return work, plan


def _check_shape(name: str, stored: tuple[int, ...] | None, expected: tuple[int, ...]) -> None:
    if stored is not None and stored != expected:
        raise UserError(
            f"checkpoint tensor {name} has shape {stored}, the model expects {expected}: "
            "the weights do not belong to this config"
        )


def plan_merge(work: LoadedModel, plan: StreamPlan, adapter: Adapter) -> list[str]:
    """Merge `adapter` into the skeleton's plan: each adapted module gets its own parameter (untied from any
    other user of its weight) whose bytes are `W0 + s·B·A`."""
    check_fits(work.module, adapter)
    modules = unwrap(work.module)
    for path, lora in sorted(adapter.modules.items()):
        _own_planned(plan, modules[path], (lora, stores_in_out(modules[path]), path))
    return sorted(adapter.modules)


def plan_untie(work: LoadedModel, plan: StreamPlan, paths: list[str]) -> list[str]:
    """`ties.untie` on a skeleton: each module at `paths` whose weight another module shares gets a parameter of
    its own, streamed from the same source; returns the paths."""
    modules = unwrap(work.module)
    untied = []
    for path in paths:
        old = getattr(modules[path], "weight", None)
        if isinstance(old, torch.Tensor) and is_shared(work.module, old):
            _own_planned(plan, modules[path])
            untied.append(path)
    return untied


def _own_planned(plan: StreamPlan, layer: torch.nn.Module, merge: tuple[ModuleLora, bool, str] | None = None) -> None:
    """Give `layer` a weight of its own on the meta device, planned from its current weight's source (`merge`:
    written as that weight merged with a LoRA)."""
    base = plan.tensors[id(layer.weight)]
    new = meta_parameter(layer.weight)
    layer.weight = new
    plan.tensors[id(new)] = Planned(base.source, base.dtype, base.shape, merge)


def check_disk_space(out: Path, weight_bytes: int) -> None:
    """Refuse, before any work, an output the disk holding `out` cannot take."""
    need = int(weight_bytes * (1 + DISK_MARGIN)) + DISK_FLOOR
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(
            f"not enough disk space for {out}: the graph needs about {_gb(need)}, {_gb(free)} is free on "
            f"{existing}; free some space or write elsewhere (-o)"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n

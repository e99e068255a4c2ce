"""Merged export: fold `s·B·A` into the base weights (zero inference cost, one adapter baked in).

Streamed (`export.stream`): the graph is traced from a weightless skeleton and each weight is merged and
written when the graph is saved, one module at a time; the caller's model is never copied or changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.inject import merge_adapter
from lora_export.artifacts.fileio import all_or_nothing, check_output_path
from lora_export.artifacts.onnxio import write_manifest
from lora_export.contract import GraphManifest, torch_dtype
from lora_export.export import trace as trace_mod
from lora_export.export.manifest import build_manifest
from lora_export.export.stream import OnWrite, StreamPlan, check_disk_space, export_skeleton, plan_merge
from lora_export.models.loading import LoadedModel


@dataclass
class ExportResult:
    path: Path
    manifest: GraphManifest  # also readable by key, as the sidecar JSON: `manifest["lora_modules"]`
    files: list[Path]


def merged_work(
    loaded: LoadedModel, adapter: Adapter | None, dtype: torch.dtype, *, allow_nonfinite: bool = False
) -> tuple[LoadedModel, StreamPlan | None]:
    """What a merged export traces: a weightless skeleton whose plan streams `W0 + s·B·A` (and the plan), or,
    for an adapter that replaces whole tensors (modules_to_save, saved embedding weights), a merged private
    copy of the weights (plan None). The caller's model is never changed."""
    if adapter is not None and (adapter.saved or adapter.base_layers):
        work = loaded.materialized().copy(dtype=dtype)
        merge_adapter(work.module, adapter, allow_nonfinite=allow_nonfinite)
        return work, None
    work, plan = export_skeleton(loaded, dtype, allow_nonfinite=allow_nonfinite)
    if adapter is not None:
        plan_merge(work, plan, adapter)
    return work, plan


def export_merged(
    loaded: LoadedModel,
    adapter: Adapter | None,
    out: str | Path,
    *,
    opset: int | None = None,
    dtype: str = "fp32",
    force: bool = False,
    allow_nonfinite: bool = False,
    batch: int = 2,
    seq: int = 16,
    on_write: OnWrite | None = None,
) -> ExportResult:
    """Export `loaded` with `adapter` merged (or the plain base model when `adapter` is None);
    `on_write(bytes done, total, tensor)` follows the weights being written."""
    work, plan = merged_work(loaded, adapter, torch_dtype(dtype), allow_nonfinite=allow_nonfinite)
    if plan is not None:
        check_disk_space(Path(out), plan.weight_bytes(work.module))
    out = check_output_path(out, force)
    model = trace_mod.trace(work, batch=batch, seq=seq, opset=opset, dtype=torch_dtype(dtype), weights=plan)
    manifest = build_manifest(
        "merged" if adapter is not None else "base",
        loaded,
        model,
        adapters=[adapter] if adapter is not None else [],
        dtype=dtype,
    )
    with all_or_nothing() as files:  # the graph and its manifest, or neither
        files += trace_mod.save(model, out, on_write=on_write)
        write_manifest(out, manifest)
    return ExportResult(path=out, manifest=manifest, files=files)

"""Merged export: fold `s·B·A` into the base weights, then trace (zero inference cost, one adapter baked in)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.inject import merge_adapter
from lora_export.contract import GraphManifest, torch_dtype
from lora_export.export import trace as trace_mod
from lora_export.export.manifest import build_manifest
from lora_export.fileio import check_output_path
from lora_export.models.loading import LoadedModel
from lora_export.onnxio import write_manifest


@dataclass
class ExportResult:
    path: Path
    manifest: GraphManifest  # also readable by key, as the sidecar JSON: `manifest["lora_modules"]`
    files: list[Path]


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
) -> ExportResult:
    """Export `loaded` with `adapter` merged (or the plain base model when `adapter` is None)."""
    out = check_output_path(out, force)
    work = loaded.copy(dtype=torch_dtype(dtype))  # the caller's model stays unmerged
    if adapter is not None:
        merge_adapter(work.module, adapter, allow_nonfinite=allow_nonfinite)
    model = trace_mod.trace(work, batch=batch, seq=seq, opset=opset, dtype=torch_dtype(dtype))
    manifest = build_manifest(
        "merged" if adapter is not None else "base",
        loaded,
        model,
        adapters=[adapter] if adapter is not None else [],
        dtype=dtype,
    )
    files = trace_mod.save(model, out)
    write_manifest(out, manifest)
    return ExportResult(path=out, manifest=manifest, files=files)

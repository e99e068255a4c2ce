"""The Python API: the same powers as the CLI, as plain functions that chain the stages.

from lora_export import api
result = api.merge_and_export("sample:gpt2", "my_adapter/", "out.onnx")
report = api.verify("sample:gpt2", "out.onnx", adapters=["my_adapter/"])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.peft_io import read_adapter, write_peft_adapter
from lora_export.adapters.spec import DEFAULT_TARGETS, LoraSpec
from lora_export.adapters.synthetic import random_adapter
from lora_export.errors import UserError
from lora_export.export.merged import ExportResult
from lora_export.fileio import check_output_path
from lora_export.models.loading import LoadedModel, load_model
from lora_export.verify.parity import ParityReport

if TYPE_CHECKING:
    from lora_export.export.decoder import DecoderExport
    from lora_export.verify.generation import GenerationReport

ModelLike = str | LoadedModel
AdapterLike = str | Path | Adapter


def as_model(model: ModelLike) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def as_adapter(adapter: AdapterLike, *, allow_nonfinite: bool = False) -> Adapter:
    return adapter if isinstance(adapter, Adapter) else read_adapter(adapter, allow_nonfinite=allow_nonfinite)


@dataclass
class ExportOutcome:
    export: ExportResult
    report: ParityReport | None


def merge_and_export(
    model: ModelLike,
    adapter: AdapterLike | None,
    out: str | Path,
    *,
    verify: bool = True,
    allow_nonfinite: bool = False,
    **export_kwargs,
) -> ExportOutcome:
    from lora_export.export.merged import export_merged
    from lora_export.verify.check import verify_graph

    loaded = as_model(model)
    ad = as_adapter(adapter, allow_nonfinite=allow_nonfinite) if adapter is not None else None
    result = export_merged(loaded, ad, out, allow_nonfinite=allow_nonfinite, **export_kwargs)
    report = verify_graph(loaded, result.path, [ad] if ad else [], check_effect=ad is not None) if verify else None
    return ExportOutcome(result, report)


def export_branched(
    model: ModelLike, out: str | Path, *, adapters: list[AdapterLike] = (), verify: bool = True, **export_kwargs
) -> ExportOutcome:
    from lora_export.export.branched import export_branched as _export
    from lora_export.verify.check import verify_graph

    loaded = as_model(model)
    ads = [as_adapter(a) for a in adapters]
    result = _export(loaded, out, adapters=ads, **export_kwargs)
    report = None
    if verify:
        layout = export_kwargs.get("layout", "inputs")
        report = verify_graph(loaded, result.path, ads if layout == "bank" else ads[:1], check_effect=bool(ads))
    return ExportOutcome(result, report)


def verify(model: ModelLike, onnx_path: str | Path, *, adapters: list[AdapterLike] = (), **kwargs) -> ParityReport:
    from lora_export.verify.check import verify_graph

    return verify_graph(as_model(model), onnx_path, [as_adapter(a) for a in adapters], **kwargs)


def make_adapter(
    model: ModelLike,
    out: str | Path,
    *,
    r: int = 8,
    alpha: float = 16.0,
    targets: list[str] | str | None = None,
    seed: int = 0,
    use_rslora: bool = False,
    force: bool = False,
) -> Adapter:
    loaded = as_model(model)
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists: pass --force to overwrite it")
    if not targets:
        if loaded.arch not in DEFAULT_TARGETS:
            raise UserError(f"no default LoRA targets for {loaded.arch!r}: pass --targets NAMES")
        targets = DEFAULT_TARGETS[loaded.arch]
    spec = LoraSpec(
        r=r, alpha=alpha, use_rslora=use_rslora, target_modules=targets if isinstance(targets, str) else list(targets)
    )
    adapter = random_adapter(loaded.module, spec, seed=seed, name=out.name)
    write_peft_adapter(adapter, out, base_model=loaded.source)
    return adapter


def pack_adapter(
    adapter: AdapterLike,
    out: str | Path,
    *,
    dtype: str | None = None,
    graph: str | Path | None = None,
    force: bool = False,
) -> Path:
    from lora_export.adapters.pack import PACK_SUFFIXES
    from lora_export.adapters.pack import pack_adapter as _pack

    out = check_output_path(out, force, PACK_SUFFIXES)
    return _pack(as_adapter(adapter), out, dtype=dtype, graph=graph)


@dataclass
class DecoderOutcome:
    export: DecoderExport
    report: GenerationReport | None


def export_decoder(
    model: ModelLike,
    out: str | Path,
    *,
    adapters: list[AdapterLike] = (),
    layout: str = "merged",
    verify: bool = True,
    **export_kwargs,
) -> DecoderOutcome:
    """A decoder folder (KV-cache graph, genai_config.json, adapters, tokenizer); `verify` checks greedy tokens
    against transformers generate."""
    from lora_export.export.decoder import export_decoder as _export

    loaded = as_model(model)
    ads = [as_adapter(a) for a in adapters]
    result = _export(loaded, out, adapters=ads, layout=layout, **export_kwargs)
    rows = len(ads) + 1 if layout == "bank" else 2  # a bank batch: each adapter and no adapter
    report = verify_generation(loaded, result.path, adapters=ads, new_tokens=8, shapes=[(rows, 6)]) if verify else None
    return DecoderOutcome(result, report)


def verify_generation(
    model: ModelLike, folder: str | Path, *, adapters: list[AdapterLike] = (), **kwargs
) -> GenerationReport:
    """Greedy tokens of a decoder folder vs transformers generate on the PyTorch model (see verify.generation)."""
    from lora_export.verify.generation import verify_generation as _verify

    return _verify(as_model(model), folder, [as_adapter(a) for a in adapters], **kwargs)

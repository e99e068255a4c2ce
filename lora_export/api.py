"""The Python API: the same powers as the CLI, as plain functions that chain the stages.

from lora_export import api
result = api.merge_and_export("sample:gpt2", "my_adapter/", "out.onnx")
report = api.verify("sample:gpt2", "out.onnx", adapters=["my_adapter/"])
report = api.verify_task("sample:e2e", "e2e_folder/", check=TaskCheck(limit=50))   # task scores vs PEFT

The CLI commands parse their options, call these functions and display what they return; the orchestration
(load -> export -> verify, which adapters verify a graph, the demo) lives here once. Slow functions take
`progress`: a callable that gets a step label and returns a context manager held while that step runs (the
CLI's spinner); None runs quietly. When that context manager yields a callable, long exports call it as
`update(bytes written, total bytes, tensor name)` while the weights are written.

Exports given a model by name load it lazily (`load_model(spec, lazy=True)`): the graph is traced from a
weightless skeleton and the weights are streamed from the checkpoint, and verification loads the model once,
for the PyTorch side only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.peft_io import write_peft_adapter
from lora_export.adapters.spec import LoraSpec, default_targets
from lora_export.adapters.synthetic import random_adapter
from lora_export.artifacts.fileio import check_output_path
from lora_export.contract import BANK, INPUTS
from lora_export.errors import UserError
from lora_export.export.merged import ExportResult
from lora_export.models.loading import LoadedModel, load_model
from lora_export.models.sources import open_adapter
from lora_export.verify.options import BackendCheck, GenerationCheck, TaskCheck
from lora_export.verify.parity import ParityReport

if TYPE_CHECKING:
    from lora_export.export.decoder_result import DecoderExport
    from lora_export.verify.generation import GenerationReport
    from lora_export.verify.task_check import TaskReport

ModelLike = str | LoadedModel
AdapterSource = str | Path | Adapter
Progress = Callable[[str], AbstractContextManager[Any]]


def as_model(model: ModelLike, *, lazy: bool = False) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, lazy=lazy)


def as_adapter(adapter: AdapterSource, *, allow_nonfinite: bool = False) -> Adapter:
    return open_adapter(adapter, allow_nonfinite=allow_nonfinite)


def _step(progress: Progress | None, label: str) -> AbstractContextManager[Any]:
    return progress(label) if progress is not None else contextlib.nullcontext()


def _check_verifiable(dtype: str, verify: bool) -> None:
    if verify and dtype == "bf16":
        raise UserError(
            "a bf16 graph cannot be verified here (ONNX Runtime's CPU kernels have no bf16): pass --no-verify "
            "and check it on a GPU runtime, or export --dtype fp16"
        )


def _writer(update: Any):
    """The step's progress callable, when the progress hook gave one."""
    return update if callable(update) else None


def _loading(model: ModelLike) -> str:
    return f"loading {model if isinstance(model, str) else model.source}"


def verifying_adapters(layout: str, adapters: list[Adapter]) -> list[Adapter]:
    """The adapters that verify a branched graph: all of them for a bank graph (mixed per row), the first
    for an inputs-layout graph (one adapter per call)."""
    return list(adapters) if layout == BANK else list(adapters[:1])


def one_adapter(adapter: AdapterSource | list[AdapterSource] | tuple | None) -> AdapterSource | None:
    """The one adapter of a merged export: None, an adapter, or a list holding at most one."""
    if not isinstance(adapter, (list, tuple)):
        return adapter
    if len(adapter) > 1:
        names = " ".join(f"--adapter {a.name if isinstance(a, Adapter) else a}" for a in adapter)
        raise UserError(
            f"merge-and-export folds one adapter into the weights, got {len(adapter)} ({names}): export each "
            "separately, or keep them side by side in one graph with export-branched --layout bank"
        )
    return adapter[0] if adapter else None


@dataclass
class ExportOutcome:
    export: ExportResult
    report: ParityReport | None


def merge_and_export(
    model: ModelLike,
    adapter: AdapterSource | None,
    out: str | Path,
    *,
    verify: bool = True,
    verify_by_layer: bool | None = None,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
    **export_kwargs,
) -> ExportOutcome:
    """Fold `adapter` into the weights (none: the base model), export to `out`, verify against PyTorch
    (`verify_by_layer`: piece by piece, `verify.by_layer`; None: when the weights would not fit in memory).
    `adapter` may be a list (the CLI's repeatable --adapter) of at most one: a merged graph holds one adapter,
    so a second one is refused, never silently dropped."""
    from lora_export.export.merged import export_merged
    from lora_export.verify.check import verify_graph

    _check_verifiable(export_kwargs.get("dtype", "fp32"), verify)
    adapter = one_adapter(adapter)
    with _step(progress, _loading(model)):
        loaded = as_model(model, lazy=True)
        ad = as_adapter(adapter, allow_nonfinite=allow_nonfinite) if adapter is not None else None
    with _step(progress, "merging and exporting") as update:
        result = export_merged(
            loaded, ad, out, allow_nonfinite=allow_nonfinite, on_write=_writer(update), **export_kwargs
        )
    report = None
    if verify:
        with _step(progress, "verifying against PyTorch"):
            report = verify_graph(
                loaded, result.path, [ad] if ad else [], check_effect=ad is not None, by_layer=verify_by_layer
            )
    return ExportOutcome(result, report)


def export_branched(
    model: ModelLike,
    out: str | Path,
    *,
    adapters: list[AdapterSource] = (),
    verify: bool = True,
    verify_by_layer: bool | None = None,
    progress: Progress | None = None,
    **export_kwargs,
) -> ExportOutcome:
    """Export with the LoRA branch kept in the graph (`layout` inputs or bank); verify with the adapters
    (`verify_by_layer` as in `merge_and_export`)."""
    from lora_export.export.branched import export_branched as _export
    from lora_export.verify.check import verify_graph

    layout = export_kwargs.get("layout", INPUTS)
    _check_verifiable(export_kwargs.get("dtype", "fp32"), verify)
    with _step(progress, _loading(model)):
        loaded = as_model(model, lazy=True)
        ads = [as_adapter(a) for a in adapters]
    with _step(progress, f"exporting branched ({layout})") as update:
        result = _export(loaded, out, adapters=ads, on_write=_writer(update), **export_kwargs)
    report = None
    if verify:
        with _step(progress, "verifying against PyTorch"):
            report = verify_graph(
                loaded,
                result.path,
                verifying_adapters(layout, ads),
                check_effect=bool(ads),
                by_layer=verify_by_layer,
            )
    return ExportOutcome(result, report)


def verify(
    model: ModelLike,
    onnx_path: str | Path | None = None,
    *,
    adapters: list[AdapterSource] = (),
    allow_nonfinite: bool = False,
    check: BackendCheck | None = None,
    on_case: Callable[[int, int], None] | None = None,
) -> ParityReport:
    """Compare two backends (default: ONNX Runtime on `onnx_path` against PyTorch with the adapters resident):
    `check` says which, on which inputs, with which tolerances (`verify.options.BackendCheck`)."""
    from lora_export.verify.check import verify_backends

    check = check or BackendCheck()
    if onnx_path is not None:
        check = dataclasses.replace(check, onnx_path=onnx_path)
    loaded = as_model(model, lazy=True)
    ads = [as_adapter(a, allow_nonfinite=allow_nonfinite) for a in adapters]
    return verify_backends(loaded, ads, check, on_case=on_case)


def optimize(
    graph: str | Path,
    out: str | Path,
    *,
    bench: bool = False,
    batch: int = 1,
    seq: int = 128,
    progress: Progress | None = None,
    **optimize_kwargs,
) -> dict[str, Any]:
    """Optimize `graph` into `out` (`passes.pipeline.optimize_file`); with `bench`, also time both graphs on ONNX
    Runtime CPU: `report["bench"]` holds the stats by graph and `ratio_after_before`."""
    from lora_export.passes.pipeline import optimize_file

    if bench and Path(graph).is_dir():
        raise UserError("--bench times single graphs: time decoder folders with `generate` or tools/benchmarks.py")
    with _step(progress, "optimizing"):
        report = optimize_file(graph, out, **optimize_kwargs)
    if bench:
        from lora_export.bench.graph_timing import measure_graphs

        with _step(progress, f"timing before/after (ONNX Runtime CPU, batch {batch}, seq {seq})"):
            timing = measure_graphs({"before": graph, "after": out}, batch=batch, seq=seq)
        measurement = timing.pop("_measurement")
        report["bench"] = {**timing, "ratio_after_before": measurement.ratio("after", "before").to_dict()}
    return report


def inspect(target: str | Path, *, base_model: ModelLike | None = None) -> dict[str, Any]:
    """What `target` is and holds: a graph (`.onnx`), a decoder folder (export-decoder), an adapter (PEFT dir or
    adapter file; `base_model` adds the trainable fraction), or a model (its LoRA-capable layers and default
    targets)."""
    from lora_export import inspection

    path = Path(target)
    text = str(target)
    if path.suffix == ".onnx":
        return inspection.inspect_onnx(path)
    if inspection.is_decoder_folder(path):
        return inspection.inspect_decoder_folder(path)
    if not text.startswith(("sample:", "py:")) and (path.is_file() or (path / "adapter_config.json").exists()):
        base = sum(p.numel() for p in as_model(base_model, lazy=True).module.parameters()) if base_model else None
        return inspection.inspect_adapter(as_adapter(path, allow_nonfinite=True), base)
    loaded = as_model(text, lazy=True)  # shapes only: weights stay on disk
    return inspection.inspect_model(
        loaded.module, loaded.arch, loaded.source, _defaults_or_none(loaded.arch, loaded.module)
    )


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
    from lora_export.adapters.validate import check_finite_alpha

    alpha = check_finite_alpha(alpha, "--alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise UserError(f"--r {r!r}: the rank must be a positive integer")
    loaded = as_model(model, lazy=True)  # shapes only
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists: pass --force to overwrite it")
    if not targets:
        targets = default_targets(loaded.arch, module=loaded.module)
    spec = LoraSpec(
        r=r, alpha=alpha, use_rslora=use_rslora, target_modules=targets if isinstance(targets, str) else list(targets)
    )
    adapter = random_adapter(loaded.module, spec, seed=seed, name=out.name)
    write_peft_adapter(adapter, out, base_model=loaded.source)
    return adapter


def pack_adapter(
    adapter: AdapterSource,
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


def bench(
    model: ModelLike,
    adapters: list[AdapterSource] = (),
    *,
    config=None,
    bank_size: int = 4,
    workdir: str | Path | None = None,
    allow_nonfinite: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
):
    """Latency per backend x mode x shape (`bench.sweep.run_bench`, a `BenchConfig`); graphs are exported to
    `workdir` (default: a temporary directory). Without adapters a random one is made; a bank is padded
    with random adapters to `bank_size`. `on_progress(what, done, total)` follows the exports and rounds."""
    from lora_export.bench.sweep import BenchConfig, bench_adapters, run_bench

    config = config or BenchConfig()
    config.check()
    loaded = as_model(model)
    ads, bank, notes = bench_adapters(
        loaded,
        [as_adapter(a, allow_nonfinite=allow_nonfinite) for a in adapters],
        bank_size=bank_size if "bank" in config.modes else 0,
        seed=config.seed,
    )
    with contextlib.ExitStack() as stack:
        wd = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lora_bench_")))
        return run_bench(
            loaded,
            ads[0],
            config,
            wd,
            bank_adapters=bank,
            progress=on_progress,
            notes=notes,
            model_name=model if isinstance(model, str) else None,
        )


def refit(
    plan: str | Path,
    adapter: AdapterSource | None,
    *,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
    **refit_kwargs,
):
    """Swap the adapter inside a refittable TensorRT engine (None: back to the base weights); `refit_kwargs`
    go to `engines.refit.refit_engine` (out, in_place, base, force, log_level)."""
    from lora_export.engines.refit import refit_engine

    ad = as_adapter(adapter, allow_nonfinite=allow_nonfinite) if adapter is not None else None
    with _step(progress, "refitting"):
        return refit_engine(plan, ad, **refit_kwargs)


def demo(out_dir: str | Path = "lora-export-demo", *, items: int = 40, progress: Progress | None = None):
    """The trained sample and its two adapters, exported as one bank decoder folder under `out_dir` (which the
    demo owns: a rerun replaces it): the base model and each adapter generate for the same meaning
    representation in one batch, PyTorch generates the same, and each row is scored on `items` test items."""
    from lora_export.demo import run_demo

    return run_demo(out_dir, items=items, step=lambda label: _step(progress, label))


@dataclass
class DecoderOutcome:
    export: DecoderExport
    report: GenerationReport | None


def export_decoder(
    model: ModelLike,
    out: str | Path,
    *,
    adapters: list[AdapterSource] = (),
    layout: str = "merged",
    verify: bool = True,
    progress: Progress | None = None,
    **export_kwargs,
) -> DecoderOutcome:
    """A decoder folder (KV-cache graph, genai_config.json, adapters, tokenizer); `verify` checks greedy tokens
    against transformers generate (a bank folder with a batch whose rows are each adapter and no adapter)."""
    from lora_export.export.decoder import export_decoder as _export

    with _step(progress, _loading(model)):
        loaded = as_model(model, lazy=True)
        ads = [as_adapter(a) for a in adapters]
    with _step(progress, f"exporting the decoder ({layout})") as update:
        result = _export(loaded, out, adapters=ads, layout=layout, on_write=_writer(update), **export_kwargs)
    report = None
    if verify:
        rows = len(ads) + 1 if layout == BANK else 2
        with _step(progress, "checking greedy generation against transformers"):
            report = verify_generation(
                loaded, result.path, adapters=ads, check=GenerationCheck(new_tokens=8, shapes=[(rows, 6)])
            )
    return DecoderOutcome(result, report)


def verify_generation(
    model: ModelLike,
    folder: str | Path,
    *,
    adapters: list[AdapterSource] = (),
    allow_nonfinite: bool = False,
    check: GenerationCheck | None = None,
) -> GenerationReport:
    """Greedy tokens of a decoder folder vs transformers generate on the PyTorch model
    (`verify.options.GenerationCheck`: new tokens, shapes, seeds, logits tolerance)."""
    from lora_export.verify.generation import verify_generation as _verify

    c = check or GenerationCheck()
    ads = [as_adapter(a, allow_nonfinite=allow_nonfinite) for a in adapters]
    return _verify(as_model(model), folder, ads, new_tokens=c.new_tokens, shapes=c.shapes, seeds=c.seeds, atol=c.atol)


def verify_task(
    model: ModelLike,
    folder: str | Path,
    *,
    adapters: list[str] = (),
    check: TaskCheck | None = None,
    progress: Progress | None = None,
) -> TaskReport:
    """Task scores (BLEU, ROUGE-L, METEOR) of a decoder folder of the trained sample next to PyTorch + PEFT on
    the same items, per adapter of the folder (`verify.options.TaskCheck`: task, split, limit, tolerance).
    `report.passed`: the same text as PEFT (fp32), or every score within `tolerance` points (quantized / fp16)."""
    from lora_export.verify.task_check import verify_task as _verify

    c = check or TaskCheck()
    name = model if isinstance(model, str) else model.source
    return _verify(
        name,
        folder,
        task=c.task,
        split=c.split,
        limit=c.limit,
        adapters=list(adapters),
        tolerance=c.tolerance,
        step=lambda label: _step(progress, label),
    )


def serve(
    folder: str | Path,
    *,
    adapters: dict[str, str | Path] | None = None,
    on_ready: Callable[[str, list[str]], None] | None = None,
    stop: Any = None,
    **options: Any,
) -> bool:
    """Serve a decoder folder with the OpenAI-compatible API on Ray Serve until Ctrl-C / SIGTERM (or until the
    `threading.Event` `stop` is set); `options` are `serving.ServeConfig` fields (port, replicas,
    max_batch_size, batch_wait_ms, address, api_key, ...). Nothing this started is left running. True when a
    signal (Ctrl-C, SIGTERM) ended it."""
    from lora_export.serving import ServeConfig
    from lora_export.serving import serve as run_server

    config = ServeConfig(str(folder), {k: str(v) for k, v in (adapters or {}).items()}, **options)
    return run_server(config, on_ready=on_ready, stop=stop)


def _defaults_or_none(arch: str, module=None) -> list[str] | None:
    try:
        return default_targets(arch, module=module)
    except UserError:
        return None

"""The bench sweep: backends x modes x shapes, exports done up front, timing by `latency.measure`.

Modes (each on every backend that can run it):

- `base`: the model without adapter (a base-model graph for ort/trt);
- `merged`: the adapter folded into the weights (PyTorch: merged weights; ort/trt: `export_merged`);
- `branched`: the side branch kept (PyTorch: the unmerged LoRA layer, PEFT's forward; ort/trt: an
  `inputs`-layout graph fed the adapter's contract tensors);
- `bank`: an ort/trt bank graph with N adapters mixed per batch row (row i uses adapter i mod N).

At each shape every candidate is measured together, interleaved (see `latency`), so ratios between
modes and backends come from the same minutes of the same machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lora_export.adapters.adapter import Adapter
from lora_export.bench.latency import Candidate, measure, set_threads, thread_settings
from lora_export.bench.report import BenchReport, BenchRow, fill_ratios, machine_info
from lora_export.contract import ADAPTER_INDEX
from lora_export.errors import MissingDependencyError, UserError
from lora_export.models.loading import LoadedModel

BENCH_BACKENDS = ("torch", "ort", "trt")
BENCH_MODES = ("base", "merged", "branched", "bank")

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class BenchConfig:
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    modes: list[str] = field(default_factory=lambda: ["base", "merged", "branched"])
    batches: list[int] = field(default_factory=lambda: [1])
    seqs: list[int] = field(default_factory=lambda: [128])
    warmup: int = 5
    iters: int = 30
    threads: int | None = None
    input_sets: int = 3
    reference: str = "base"
    seed: int = 0
    order: str = "shuffle"
    providers: list[str] | None = None
    device: str = "cpu"  # PyTorch device (cuda: timed calls end with torch.cuda.synchronize)

    def check(self) -> None:
        bad = [b for b in self.backends if b not in BENCH_BACKENDS]
        if bad:
            raise UserError(f"--backends: unknown {', '.join(bad)}; choose from {', '.join(BENCH_BACKENDS)}")
        bad = [m for m in self.modes if m not in BENCH_MODES]
        if bad:
            raise UserError(f"--modes: unknown {', '.join(bad)}; choose from {', '.join(BENCH_MODES)}")
        if self.iters < 1 or self.warmup < 0 or self.input_sets < 1:
            raise UserError("--iters and --input-sets must be at least 1, --warmup at least 0")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise UserError(f"--device {self.device!r}: choose cpu or cuda[:N]")
        if not self.backends or not self.modes or not self.batches or not self.seqs:
            raise UserError("bench needs at least one backend, mode, batch and sequence length")
        if min(self.batches) < 1 or min(self.seqs) < 1:
            raise UserError("--batch and --seq-len values must be at least 1")


@dataclass
class Target:
    """One (backend, mode): a runner (entered later) and how to add LoRA feeds to model inputs."""

    backend: str
    mode: str
    make_runner: Callable[[], Any]
    lora_feeds: Callable[[int], dict[str, np.ndarray]] = lambda batch: {}
    runner: Any = None

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.mode}"


def bench_adapters(
    loaded: LoadedModel, given: list[Adapter], *, bank_size: int = 0, seed: int = 0
) -> tuple[list[Adapter], list[Adapter], list[str]]:
    """The adapters to bench: those given, else one random (seeded); the bank padded with random ones."""
    notes = []
    ads = list(given)
    if not ads:
        ads = [random_bench_adapter(loaded, seed, "random0")]
        notes.append(f"no --adapter given: using a random adapter (seed {seed}, r=8, alpha=16, default targets)")
    bank = list(ads)
    if len(bank) < bank_size:
        extra = bank_size - len(bank)
        bank += [random_bench_adapter(loaded, seed + 1 + i, f"random{len(bank) + i}") for i in range(extra)]
        notes.append(f"bank: {extra} random adapter(s) added to reach --bank-size {bank_size}")
    return ads, bank, notes


def random_bench_adapter(loaded: LoadedModel, seed: int, name: str) -> Adapter:
    from lora_export.adapters.spec import LoraSpec, default_targets
    from lora_export.adapters.synthetic import random_adapter

    spec = LoraSpec(r=8, alpha=16, target_modules=default_targets(loaded.arch, "pass --adapter DIR", loaded.module))
    return random_adapter(loaded.module, spec, seed=seed, name=name)


def merged_copy(loaded: LoadedModel, adapter: Adapter) -> LoadedModel:
    """A copy of the model with `adapter` folded into its weights (PyTorch's merged mode)."""
    from lora_export.adapters.inject import merge_adapter

    work = loaded.copy()
    merge_adapter(work.module, adapter)
    return work


def export_graphs(
    loaded: LoadedModel,
    adapter: Adapter,
    bank_adapters: list[Adapter],
    modes: list[str],
    workdir: Path,
    *,
    progress: Progress | None = None,
) -> dict[str, tuple[Path, float]]:
    """Export the graph each ort/trt mode needs into `workdir` (outside any timing): mode -> (path, seconds)."""
    from lora_export.bench.standard_graphs import STANDARD_KINDS, export_standard_graphs

    wanted = [m for m in modes if m in STANDARD_KINDS]
    graphs = export_standard_graphs(
        loaded, workdir, adapter, kinds=wanted, bank_adapters=bank_adapters, force=True, progress=progress
    )
    return {mode: (g.path, g.seconds) for mode, g in graphs.items()}


def _graph_lora_feeds(path: Path, mode: str, adapter: Adapter, bank_adapters: list[Adapter]):
    from lora_export.artifacts.onnxio import read_slots

    if mode == "branched":
        fixed = read_slots(path).adapter_feeds(adapter)
        return lambda batch: fixed
    if mode == "bank":
        fixed = read_slots(path).bank_feeds(bank_adapters)
        n = len(bank_adapters)
        return lambda batch: {**fixed, ADAPTER_INDEX: np.arange(batch, dtype=np.int64) % n}
    return lambda batch: {}


def build_targets(
    loaded: LoadedModel,
    adapter: Adapter,
    bank_adapters: list[Adapter],
    config: BenchConfig,
    graphs: dict[str, Path],
    notes: list[str],
) -> list[Target]:
    from lora_export.backends.onnxrt import OrtRunner
    from lora_export.backends.torch_runner import TorchRunner

    targets: list[Target] = []
    trt_mod = None
    if "trt" in config.backends:
        trt_mod = _load_trt()
    for backend in config.backends:
        for mode in config.modes:
            if backend == "torch":
                if mode == "bank":
                    notes.append("torch/bank skipped: PyTorch eager has no per-row adapter mixing to compare with")
                    continue
                if mode == "base":
                    targets.append(
                        Target("torch", mode, lambda dev=config.device: TorchRunner(loaded, None, device=dev))
                    )
                elif mode == "merged":
                    targets.append(
                        Target(
                            "torch",
                            mode,
                            lambda dev=config.device: TorchRunner(merged_copy(loaded, adapter), None, device=dev),
                        )
                    )
                else:
                    targets.append(
                        Target("torch", mode, lambda dev=config.device: TorchRunner(loaded, adapter, device=dev))
                    )
            elif backend == "ort":
                path = graphs[mode]
                targets.append(
                    Target(
                        "ort",
                        mode,
                        lambda p=path: OrtRunner(p, config.providers, config.threads, spinning=False),
                        _graph_lora_feeds(path, mode, adapter, bank_adapters),
                    )
                )
            elif backend == "trt" and trt_mod is not None:
                path = graphs[mode]
                try:
                    plan = _build_engine(path, config.batches, config.seqs)
                except UserError as e:
                    notes.append(f"trt/{mode} skipped: {e}")
                    continue
                targets.append(
                    Target(
                        "trt",
                        mode,
                        lambda p=plan: trt_mod.TrtRunner(p),
                        _graph_lora_feeds(path, mode, adapter, bank_adapters),
                    )
                )
    return targets


def _load_trt():
    """The TensorRT runner module, or MissingDependencyError (no TensorRT, no GPU) for a skip note."""
    from lora_export.verify.check import load_trt_runner_class

    load_trt_runner_class()
    import lora_export.backends.trt as trt_mod

    return trt_mod


def _build_engine(onnx_path: Path, batches: list[int], seqs: list[int]) -> Path:
    """Build an engine whose profile covers the sweep's shapes (`engines.build`), outside any timing."""
    from lora_export.engines.build import BuildOptions, build_engine

    b, s = sorted(batches), sorted(seqs)
    shapes = [f"batch:{b[0]},{b[0]},{b[-1]}", f"sequence:{s[0]},{s[0]},{s[-1]}"]
    plan = onnx_path.with_suffix(".plan")
    build_engine(onnx_path, plan, BuildOptions(shapes=shapes), force=True)
    return plan


def run_bench(
    loaded: LoadedModel,
    adapter: Adapter,
    config: BenchConfig,
    workdir: str | Path,
    *,
    bank_adapters: list[Adapter] | None = None,
    graphs: dict[str, str | Path] | None = None,
    progress: Progress | None = None,
    notes: list[str] | None = None,
    model_name: str | None = None,
) -> BenchReport:
    """Export what the modes need (or use `graphs`: mode -> path), then measure every shape interleaved."""
    config.check()
    if config.device.startswith("cuda") and "torch" in config.backends:
        import torch

        if not torch.cuda.is_available():
            raise MissingDependencyError("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    notes = list(notes or [])
    bank_adapters = list(bank_adapters or [adapter])
    set_threads(config.threads)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if "trt" in config.backends:  # find out before exporting anything for it
        try:
            _load_trt()
        except MissingDependencyError as e:
            notes.append(f"trt skipped: {e}")
            config = replace(config, backends=[b for b in config.backends if b != "trt"])
    graph_modes = [m for m in config.modes if any(b in ("ort", "trt") for b in config.backends)]
    paths = {m: Path(p) for m, p in (graphs or {}).items()}
    missing = [m for m in graph_modes if m not in paths]
    export_s = {}
    if missing:
        for mode, (path, seconds) in export_graphs(
            loaded, adapter, bank_adapters, missing, workdir, progress=progress
        ).items():
            paths[mode], export_s[mode] = path, round(seconds, 2)
    targets = build_targets(loaded, adapter, bank_adapters, config, paths, notes)
    if not targets:
        raise UserError("nothing to measure: every backend/mode combination was skipped (" + "; ".join(notes) + ")")
    rows: list[BenchRow] = []
    shapes = [(b, s) for b in config.batches for s in config.seqs]
    with contextlib.ExitStack() as stack:
        for t in targets:
            t.runner = stack.enter_context(t.make_runner())
        for k, (batch, seq) in enumerate(shapes):
            candidates = []
            for t in targets:
                feed_sets = []
                for i in range(config.input_sets):
                    feeds = {n: v.numpy() for n, v in loaded.make_inputs(batch, seq, config.seed + i).items()}
                    feed_sets.append({**feeds, **t.lora_feeds(batch)})
                meta = {"backend": t.backend, "mode": t.mode, "batch": batch, "seq": seq}
                candidates.append(Candidate.from_runner(t.name, t.runner, feed_sets, tokens=batch * seq, meta=meta))
            label = f"batch {batch}, seq {seq} ({k + 1}/{len(shapes)})"
            result = measure(
                candidates,
                warmup=config.warmup,
                iters=config.iters,
                seed=config.seed,
                order=config.order,
                on_round=(lambda d, n, lb=label: progress(lb, d, n)) if progress else None,
            )
            for t, st in zip(targets, result.stats):
                rows.append(BenchRow(t.backend, t.mode, batch, seq, st))
    fill_ratios(rows, config.reference)
    settings = {**asdict(config), "threads": thread_settings(config.threads), "export_s": export_s}
    return BenchReport(
        model=model_name or loaded.source,
        adapters=[a.name for a in bank_adapters] if "bank" in config.modes else [adapter.name],
        machine=machine_info(),
        settings=settings,
        rows=rows,
        notes=notes,
    )

"""Verify one backend against another (Polygraphy-style) on several seeded input sets and shapes.

Backends: `torch` (the model with the adapter unmerged: PEFT itself when it is installed, our own LoRA
layer otherwise; the report's reference label says which), `ort` (ONNX Runtime on an exported graph),
`trt` (a TensorRT engine, when TensorRT and a GPU exist). Merged graphs run as they are; branched graphs get
the adapter's contract tensors as feeds; bank graphs get batches of at least N + 1 rows, one for each adapter
and one with "no adapter", and the PyTorch side gives each row its own adapter.

Besides parity, the adapter-effect check requires the adapter to move the outputs well above the parity
error, so an adapter silently dropped somewhere cannot pass.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_export.adapters.adapter import Adapter
from lora_export.artifacts.memory import release_freed_memory
from lora_export.artifacts.onnxio import InitializerReader, load_onnx_header, slots_of_proto
from lora_export.backends.onnxrt import cast_feeds
from lora_export.backends.torch_runner import TorchRunner
from lora_export.contract import ADAPTER_INDEX, BANK, INPUTS, MERGED, NO_ADAPTER, SlotTable, precision
from lora_export.errors import MissingDependencyError, UserError
from lora_export.models.loading import LoadedModel
from lora_export.verify.by_layer import (
    SegmentedGraph,
    describe,
    graph_weight_bytes,
    jit_module,
    needs_by_layer,
)
from lora_export.verify.options import BackendCheck
from lora_export.verify.parity import QUANTIZED_CRITERIA, ParityReport, adapter_effect, compare_outputs
from lora_export.verify.peft_reference import PeftSide, resolve_oracle

BACKENDS = ("torch", "ort", "trt")
DEFAULT_SHAPES = [(2, 16), (3, 7), (1, 23)]  # the export's example shape, then two others


def make_feeds(loaded: LoadedModel, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in loaded.make_inputs(batch, seq, seed).items()}


def load_trt_runner_class():
    """`TrtRunner`, or a one-line MissingDependencyError (exit 3) when the TensorRT backend cannot run here."""
    try:
        from lora_export.backends.trt import TrtRunner
        from lora_export.engines import _trt
    except MissingDependencyError:
        raise
    except ImportError as e:
        raise MissingDependencyError(
            f"the TensorRT backend is not available ({e}): pip install 'lora-export[gpu]' on a machine with a GPU"
        ) from None
    reason = _trt.unavailable_reason()
    if reason:
        raise MissingDependencyError(reason)
    return TrtRunner


# -- sides: one backend, entered, turning model inputs (+ row assignment) into outputs ------------------------


@dataclass
class TorchSide:
    """PyTorch eager with each adapter resident in turn (unmerged) on one model; per-row composition for bank
    comparisons."""

    loaded: LoadedModel
    adapters: list[Adapter]
    label: str = "torch"
    slots: SlotTable | None = None
    dtype: str = "fp32"
    runner: TorchRunner | None = None

    by_layer: bool = False

    def __enter__(self) -> TorchSide:
        self.runner = TorchRunner(
            jit_loaded(self.loaded) if self.by_layer else self.loaded, None, adapters=self.adapters
        )
        self.runner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.runner.__exit__(None, None, None)
        self.runner = None

    def _run(self, index: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runner.use(self.adapters[index] if index >= 0 else None)
        return self.runner.infer(feeds)

    def outputs(self, feeds: dict[str, np.ndarray], rows: list[int] | None) -> dict[str, np.ndarray]:
        if rows is None:
            return self._run(0 if self.adapters else NO_ADAPTER, feeds)
        out: dict[str, np.ndarray] = {}
        for idx in sorted(set(rows)):
            for name, value in self._run(idx, feeds).items():
                target = out.setdefault(name, np.empty_like(value))
                for i, row in enumerate(rows):
                    if row == idx:
                        target[i] = value[i]
        return out

    def base_outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(NO_ADAPTER, feeds)


@dataclass
class GraphSide:
    """An exported graph on ONNX Runtime or TensorRT; the adapters become LoRA feeds per the graph's layout."""

    runner: Any
    slots: SlotTable
    adapters: list[Adapter]
    label: str
    dtype: str = "fp32"
    session: Any = None  # ORT session, for input dtype casts

    def __enter__(self) -> GraphSide:
        self.runner.__enter__()
        self.session = getattr(self.runner, "session", None)
        if self.session is not None:
            path = getattr(self.runner, "path", None)
            self.slots = SlotTable.from_session(self.session, InitializerReader(path) if path else None)
            self.dtype = precision(o.type for o in self.session.get_outputs())  # the outputs' precision
        self.extra = _lora_feeds(self.slots, self.adapters)
        return self

    def __exit__(self, *exc) -> None:
        self.runner.__exit__(None, None, None)

    def feeds_for(self, feeds: dict[str, np.ndarray], rows: list[int] | None) -> dict[str, np.ndarray]:
        full = {**feeds, **self.extra}
        if rows is not None and self.slots.layout == BANK:
            full[ADAPTER_INDEX] = np.array(rows, dtype=np.int64)
        return cast_feeds(self.session, full) if self.session is not None else full

    def outputs(self, feeds: dict[str, np.ndarray], rows: list[int] | None) -> dict[str, np.ndarray]:
        return self.runner.infer(self.feeds_for(feeds, rows))


def _check_layout(slots: SlotTable, adapters: list[Adapter]) -> None:
    if slots.layout == MERGED and len(adapters) > 1:
        raise UserError("a merged graph holds one adapter: give at most one --adapter")
    if slots.layout == INPUTS and len(adapters) > 1:
        raise UserError("verify one adapter at a time on an inputs-layout graph (or use a bank graph)")


def open_side(
    backend: str,
    loaded: LoadedModel,
    adapters: list[Adapter],
    *,
    onnx_path: str | Path | None = None,
    engine_path: str | Path | None = None,
    providers: list[str] | None = None,
    oracle: str = "auto",
    by_layer: bool = False,
):
    """A side for `backend` (not yet entered). Graph sides need `onnx_path` (ort) or `engine_path` (trt); the
    torch side runs PEFT or our own LoRA layer as `oracle` says (`peft_reference.resolve_oracle`). `by_layer`:
    each side runs one piece of the model at a time (`verify.by_layer`)."""
    if backend == "torch":
        return torch_side(loaded, list(adapters), oracle, by_layer)
    if backend == "ort":
        from lora_export.backends.onnxrt import OrtRunner

        if onnx_path is None:
            raise UserError("the ort backend needs the graph: pass --onnx PATH")
        header = load_onnx_header(onnx_path)  # slots and precision before any session holds the weights
        return GraphSide(
            SegmentedGraph(onnx_path, providers) if by_layer else OrtRunner(onnx_path, providers),
            slots_of_proto(header, InitializerReader(onnx_path) if by_layer else None),
            list(adapters),
            f"ort:{Path(onnx_path).name}",
            precision(o.type.tensor_type.elem_type for o in header.graph.output),
        )
    if backend == "trt":
        if engine_path is None:
            raise UserError("the trt backend needs an engine: pass --engine PLAN (see build-engine)")
        runner_cls = load_trt_runner_class()
        # an engine's LoRA slots are those of the graph it was built from (give --onnx), else merged
        slots, dtype = SlotTable(MERGED), "fp32"
        if onnx_path is not None:
            header = load_onnx_header(onnx_path)
            slots = slots_of_proto(header, InitializerReader(onnx_path))
            dtype = precision(o.type.tensor_type.elem_type for o in header.graph.output)  # the outputs' precision
        return GraphSide(runner_cls(engine_path), slots, list(adapters), f"trt:{Path(engine_path).name}", dtype)
    raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def torch_side(loaded: LoadedModel, adapters: list[Adapter], oracle: str = "auto", by_layer: bool = False):
    """The PyTorch reference: PEFT's own forward (`PeftSide`) when `oracle` resolves to peft, else our LoRA layer
    (`TorchSide`); its label says which ran. `by_layer`: each module's weights read just in time."""
    if resolve_oracle(oracle) == "peft":
        return PeftSide(loaded, adapters, by_layer=by_layer)
    fallback = " (fallback: peft is not installed)" if oracle == "auto" else ""
    return TorchSide(loaded, adapters, label=f"torch+lora-export{fallback}", by_layer=by_layer)


def jit_loaded(loaded: LoadedModel) -> LoadedModel:
    """`loaded` over a module whose weights are read module by module at each forward (`by_layer.jit_module`)."""
    run = copy.copy(loaded)
    run.module, run.checkpoint, run.rebuild = jit_module(loaded), None, None
    return run


def choose_by_layer(
    by_layer: bool | None, loaded: LoadedModel, adapters: list[Adapter], onnx_path, backends: tuple[str, str]
) -> bool:
    """Whether to verify piece by piece: `by_layer` when given (True refuses what cannot run that way), else when
    the graph's weights would not fit in the memory available and the model can be streamed."""
    if by_layer is False:
        return False
    problem = None
    if onnx_path is None or set(backends) != {"torch", "ort"}:
        problem = "a by-layer verify compares PyTorch with ONNX Runtime (--reference torch --candidate ort)"
    elif loaded.checkpoint is None:
        problem = f"{loaded.source} is not a model directory with safetensors weights (a by-layer verify reads them)"
    elif any(a.is_dora or a.saved or a.base_layers for a in adapters):
        problem = "DoRA adapters and adapters with modules_to_save or saved embedding layers are verified whole"
    if by_layer is None:
        return problem is None and needs_by_layer(graph_weight_bytes(load_onnx_header(onnx_path)))
    if problem:
        raise UserError(f"cannot verify by layer: {problem}; verify the whole model (without --by-layer)")
    return True


def _is_torch(side) -> bool:
    return isinstance(side, (TorchSide, PeftSide))


def _label_slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def save_case(
    directory: str | Path,
    label: str,
    feeds: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
) -> list[str]:
    """Keep a failing case for reproduction: `<case>.inputs.npz` (every feed) and `<case>.outputs.npz`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stem = _label_slug(label) or "case"
    inputs, outputs = d / f"{stem}.inputs.npz", d / f"{stem}.outputs.npz"
    np.savez(inputs, **feeds)
    np.savez(outputs, **{f"reference.{k}": v for k, v in ref.items()}, **{f"candidate.{k}": v for k, v in got.items()})
    return [str(inputs), str(outputs)]


def verify_backends(
    loaded: LoadedModel,
    adapters: list[Adapter],
    check: BackendCheck | None = None,
    *,
    candidate_adapters: list[Adapter] | None = None,
    on_case=None,
) -> ParityReport:
    """Compare `candidate` with `reference` on every (seed, shape); see the module docstring.

    `candidate_adapters` overrides what the candidate is fed (default: `adapters`); tests use it to show that
    a dropped adapter fails. `on_case(done, total)` is called after each case of each backend (progress bars).

    The backends run one after the other (PyTorch first), each over every case, and the outputs are compared
    at the end: only one copy of the weights is in memory at a time (a lazily loaded model is loaded for its
    turn and released after it).
    `check.oracle`: whose LoRA the torch side runs ("auto": PEFT when installed, "peft", "lora-export").
    `check.by_layer`: run each side one piece of the model at a time (`verify.by_layer`), for a model whose weights do
    not fit in memory; None: when they would not (a lazily loaded model directory only). `report.method` says
    which way it ran.

    A quantized ONNX graph (int8/int4 base) is judged on agreement, not elementwise error: `criteria`
    (`check.criteria`, default `QUANTIZED_CRITERIA[scheme]`: cosine and top-1 agreement per output); its adapter-effect
    check weighs the adapter's effect against the mean abs error (quantization noise), not the max.
    """
    c = check or BackendCheck()
    reference, candidate, onnx_path, engine_path = c.reference, c.candidate, c.onnx_path, c.engine_path
    shapes, seeds, atol, rtol, providers = c.shapes, c.seeds, c.atol, c.rtol, c.providers
    check_effect, save_inputs, oracle, criteria, by_layer = (
        c.check_effect,
        c.save_inputs,
        c.oracle,
        c.criteria,
        c.by_layer,
    )
    if reference == candidate:
        raise UserError(f"reference and candidate are both {reference!r}: compare two different backends")
    shapes = shapes or DEFAULT_SHAPES
    adapters = list(adapters)
    cand_adapters = adapters if candidate_adapters is None else list(candidate_adapters)
    by_layer = choose_by_layer(by_layer, loaded, adapters + cand_adapters, onnx_path, (reference, candidate))
    kw = dict(onnx_path=onnx_path, engine_path=engine_path, providers=providers, oracle=oracle, by_layer=by_layer)
    if criteria is None and onnx_path is not None and "ort" in (reference, candidate):
        from lora_export.passes.quantize import graph_scheme

        scheme = graph_scheme(onnx_path)
        criteria = QUANTIZED_CRITERIA[scheme] if scheme else None
    ref_side = open_side(reference, loaded, adapters, **kw)
    cand_side = open_side(candidate, loaded, cand_adapters, **kw)
    graph_sides = [s for s in (ref_side, cand_side) if isinstance(s, GraphSide)]
    for s in graph_sides:
        _check_layout(s.slots, adapters)
    bank = next((s.slots for s in graph_sides if s.slots.layout == BANK), None)
    if bank is not None:  # every adapter and the no-adapter row in every case: N + 1 rows at least
        shapes = [(max(b, len(adapters) + 1), s) for b, s in shapes]
    dtype = precision(s.dtype for s in graph_sides)
    effect = bool(adapters) and check_effect
    truth = ref_side if _is_torch(ref_side) else None
    extra_truth = torch_side(loaded, adapters, oracle, by_layer) if effect and truth is None else None
    cases = [
        (f"seed={seed} batch={batch} seq={seq}", make_feeds(loaded, batch, seq, seed), batch)
        for seed in seeds
        for batch, seq in shapes
    ]
    rows = [_row_assignment(bank, adapters, batch) for _, _, batch in cases]
    sides = [s for s in (ref_side, cand_side, extra_truth) if s is not None]
    sides.sort(key=lambda s: not _is_torch(s))  # PyTorch first: its model is released before a session
    results: dict[int, list] = {}
    fed: list = []
    bases: list = []
    total, done = len(sides) * len(cases), 0
    for side in sides:  # one backend at a time: never two copies of the weights in memory
        release_freed_memory()  # what the previous side freed goes back to the OS before this one loads
        with side:
            results[id(side)] = []
            for (_, feeds, _), row in zip(cases, rows):
                results[id(side)].append(side.outputs(feeds, row))
                if side is cand_side and save_inputs is not None:
                    fed.append(side.feeds_for(feeds, row) if isinstance(side, GraphSide) else feeds)
                if effect and side is (truth or extra_truth):
                    bases.append(side.base_outputs(feeds))
                done += 1
                if on_case is not None:
                    on_case(done, total)
    report = ParityReport(reference=ref_side.label, candidate=cand_side.label)
    report.method = describe(by_layer)
    worst_err, effects, covered = 0.0, [], set()
    for i, (label, _, _) in enumerate(cases):
        covered.update(rows[i] or ())
        ref, got = results[id(ref_side)][i], results[id(cand_side)][i]
        case = compare_outputs(ref, got, dtype=dtype, atol=atol, rtol=rtol, label=label, criteria=criteria)
        report.cases.append(case)
        errs = [o.mean_abs if criteria else o.max_abs for o in case.outputs]
        worst_err = max([worst_err] + [e for e in errs if np.isfinite(e)])
        if effect:
            effects.append((results[id(truth or extra_truth)][i], bases[i]))
        if save_inputs is not None and not case.passed:
            report.artifacts += save_case(save_inputs, label, fed[i], ref, got)
    if bank is not None:
        missing = sorted(set(range(len(adapters))) - covered)
        report.checks["bank_rows"] = {
            "adapters": len(adapters),
            "no_adapter_row": NO_ADAPTER in covered,
            "passed": not missing and NO_ADAPTER in covered,
            "reason": f"adapters {missing} never ran in a row" if missing else "",
        }
    if effects:
        report.checks["adapter_effect"] = max(
            (adapter_effect(w, b, worst_err) for w, b in effects), key=lambda e: e["effect_max_abs"]
        )
    return report


def verify_graph(
    loaded: LoadedModel,
    onnx_path: str | Path,
    adapters: list[Adapter],
    *,
    shapes: list[tuple[int, int]] | None = None,
    seeds: list[int] = (0,),
    atol: dict[str, float] | None = None,
    rtol: dict[str, float] | None = None,
    providers: list[str] | None = None,
    check_effect: bool = True,
    oracle: str = "auto",
    by_layer: bool | None = None,
) -> ParityReport:
    """ONNX Runtime on `onnx_path` against the PyTorch reference (the export path's check)."""
    check = BackendCheck(
        onnx_path=onnx_path,
        shapes=shapes,
        seeds=seeds,
        atol=atol,
        rtol=rtol,
        providers=providers,
        check_effect=check_effect,
        oracle=oracle,
        by_layer=by_layer,
    )
    return verify_backends(loaded, adapters, check)


def _lora_feeds(slots: SlotTable, adapters: list[Adapter]) -> dict[str, np.ndarray]:
    if slots.layout == INPUTS and adapters:
        return slots.adapter_feeds(adapters[0])
    if slots.layout == BANK:
        return slots.bank_feeds(adapters)
    return {}


def _row_assignment(bank: SlotTable | None, adapters: list[Adapter], batch: int) -> list[int] | None:
    """Bank graphs: row i uses adapter i mod (N+1), where N means "no adapter" (`NO_ADAPTER`); with two or more
    rows the last row is always "no adapter", so the base rows are checked whatever the number of adapters."""
    if bank is None:
        return None
    n = len(adapters)
    rows = [(i % (n + 1)) if (i % (n + 1)) < n else NO_ADAPTER for i in range(batch)]
    if batch >= 2:
        rows[-1] = NO_ADAPTER
    return rows

"""Verify an exported graph against the PyTorch reference on several seeded input sets.

The reference is the model with the adapter resident and unmerged (PEFT's forward). Merged graphs are
run as they are; branched graphs get the adapter's contract tensors as feeds; bank graphs get a batch
whose rows cycle through the adapters and "no adapter", each row compared with its own reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_export.adapters.adapter import Adapter
from lora_export.backends.onnxrt import OrtRunner
from lora_export.backends.torch_runner import TorchRunner
from lora_export.errors import UserError
from lora_export.models.loading import LoadedModel
from lora_export.runtime.slots import GraphSlots, adapter_feeds, bank_feeds
from lora_export.verify.parity import ParityReport, adapter_effect, compare_outputs

DEFAULT_SHAPES = [(2, 16), (3, 7), (1, 23)]  # the export's example shape, then two others


def make_feeds(loaded: LoadedModel, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in loaded.make_inputs(batch, seq, seed).items()}


def _cast_for(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    types = {i.name: i.type for i in session.get_inputs()}
    out = {}
    for k, v in feeds.items():
        if types.get(k) == "tensor(float16)" and v.dtype == np.float32:
            v = v.astype(np.float16)
        out[k] = v
    return out


def graph_dtype(session) -> str:
    return "fp16" if any(o.type == "tensor(float16)" for o in session.get_outputs()) else "fp32"


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
) -> ParityReport:
    shapes = shapes or DEFAULT_SHAPES
    with OrtRunner(onnx_path, providers) as ort_runner:
        session = ort_runner.session
        slots = GraphSlots.from_session(session)
        dtype = graph_dtype(session)
        if slots.layout == "merged" and len(adapters) > 1:
            raise UserError("a merged graph holds one adapter: give at most one --adapter")
        if slots.layout == "inputs" and len(adapters) > 1:
            raise UserError("verify one adapter at a time on an inputs-layout graph (or use a bank graph)")
        report = ParityReport(reference="torch", candidate=f"ort:{Path(onnx_path).name}")
        refs = [TorchRunner(loaded, a) for a in adapters] + [TorchRunner(loaded, None)]
        for r in refs:
            r.__enter__()
        try:
            extra = _lora_feeds(slots, adapters)
            worst_err, effect_pairs = 0.0, []
            for seed in seeds:
                for batch, seq in shapes:
                    feeds = make_feeds(loaded, batch, seq, seed)
                    rows = _row_assignment(slots, adapters, batch)
                    ref = _reference(refs, feeds, rows)
                    if rows is not None:
                        feeds = {**feeds, "adapter_index": np.array(rows, dtype=np.int64)}
                    got = ort_runner.infer(_cast_for(session, {**feeds, **extra}))
                    case = compare_outputs(
                        ref, got, dtype=dtype, atol=atol, rtol=rtol, label=f"seed={seed} batch={batch} seq={seq}"
                    )
                    report.cases.append(case)
                    worst_err = max([worst_err] + [o.max_abs for o in case.outputs])
                    if adapters:
                        effect_pairs.append((ref, refs[-1].infer(feeds)))
            if adapters and check_effect:
                effect = max(
                    (adapter_effect(r, b, worst_err) for r, b in effect_pairs), key=lambda e: e["effect_max_abs"]
                )
                report.checks["adapter_effect"] = effect
        finally:
            for r in refs:
                r.__exit__(None, None, None)
    return report


def _lora_feeds(slots: GraphSlots, adapters: list[Adapter]) -> dict[str, np.ndarray]:
    if slots.layout == "inputs" and adapters:
        return adapter_feeds(adapters[0], slots)
    if slots.layout == "bank":
        return bank_feeds(adapters, slots)
    return {}


def _row_assignment(slots: GraphSlots, adapters: list[Adapter], batch: int) -> list[int] | None:
    """Bank graphs: row i uses adapter i mod (N+1), where N means "no adapter" (-1)."""
    if slots.layout != "bank":
        return None
    n = len(adapters)
    return [(i % (n + 1)) if (i % (n + 1)) < n else -1 for i in range(batch)]


def _reference(refs: list[TorchRunner], feeds: dict[str, np.ndarray], rows: list[int] | None) -> dict[str, np.ndarray]:
    if rows is None:
        return refs[0].infer(feeds)
    per_adapter = {}
    out: dict[str, np.ndarray] = {}
    for i, idx in enumerate(rows):
        runner = refs[idx] if idx >= 0 else refs[-1]
        if id(runner) not in per_adapter:
            per_adapter[id(runner)] = runner.infer(feeds)
        for name, value in per_adapter[id(runner)].items():
            out.setdefault(name, np.empty_like(value))[i] = value[i]
    return out

"""Timing graphs without their model: synthetic feeds read from the graph, and interleaved ORT latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lora_export.contract import ADAPTER_INDEX, ATTENTION_MASK, INPUTS, NO_ADAPTER, numpy_dtype, weight_names


def graph_feeds(path: str | Path, batch: int, seq: int, *, seed: int = 0, rank: int = 8) -> dict[str, Any]:
    """Feeds for timing a graph without its model: token ids < 100, a full attention mask, and for an
    inputs-layout graph random LoRA tensors of `rank` (so the branch does work); bank graphs keep their
    defaults (no adapter: every row's index is `NO_ADAPTER`)."""
    import onnx_ir as ir

    from lora_export.artifacts.onnxio import slots_of_ir

    model = ir.load(path)
    rng = np.random.default_rng(seed)
    slots = slots_of_ir(model)
    feeds: dict[str, Any] = {}
    for v in model.graph.inputs:
        if v.const_value is not None:
            continue
        name = v.name
        if name == ADAPTER_INDEX:
            feeds[name] = np.full((batch,), NO_ADAPTER, dtype=np.int64)
        elif name == ATTENTION_MASK:
            feeds[name] = np.ones((batch, seq), dtype=np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), dtype=np.int64)
        elif v.dtype == ir.DataType.INT64:
            feeds[name] = rng.integers(0, 100, size=(batch, seq), dtype=np.int64)
        else:
            np_dtype = numpy_dtype("fp16" if v.dtype == ir.DataType.FLOAT16 else "fp32")
            feeds[name] = rng.standard_normal((batch, seq)).astype(np_dtype)
    if slots.layout == INPUTS:
        for path_, slot in slots.slots.items():
            a = rng.standard_normal((slot.in_features, rank)) / np.sqrt(slot.in_features)
            b = rng.standard_normal((rank, slot.out_features)) * 0.01
            a_name, b_name = weight_names(path_)
            feeds[a_name] = a.astype(slots.np_dtype)
            feeds[b_name] = b.astype(slots.np_dtype)
    return feeds


def measure_graphs(
    graphs: dict[str, str | Path],
    *,
    batch: int = 1,
    seq: int = 128,
    iters: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    extra: list | None = None,
) -> dict[str, Any]:
    """ONNX Runtime CPU latency of several graphs (plus `extra` candidates), interleaved in one process by
    `lora_export.bench.latency.measure`; returns stats by name and the `Measurement` under `_measurement`."""
    from lora_export.backends.onnxrt import OrtRunner
    from lora_export.bench.latency import Candidate, measure

    candidates = []
    for name, path in graphs.items():
        runner = OrtRunner(path, threads=threads, spinning=False).__enter__()  # spinning off: see session_options
        feed_sets = [graph_feeds(path, batch, seq, seed=s) for s in range(3)]
        candidates.append(Candidate.from_runner(name, runner, feed_sets, tokens=batch * seq))
    candidates += list(extra or [])
    result = measure(candidates, warmup=warmup, iters=iters)
    return {s.name: s.to_dict(samples=False) for s in result.stats} | {"_measurement": result}

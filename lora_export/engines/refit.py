"""Swap the adapter inside a built engine by refitting weights (seconds, instead of a rebuild).

TensorRT calls: `Runtime.deserialize_cuda_engine`, `Refitter(engine, logger)`, `get_all_weights`,
`get_weights_prototype(name)` (dtype and element count checked before setting), `set_named_weights(name,
Weights(array))`, `get_missing_weights` (must be empty; TensorRT lists weights it fused with ones we set,
which we supply from the graph), `refit_cuda_engine`, then `ICudaEngine.serialize`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from lora_export.adapters.adapter import Adapter
from lora_export.artifacts.fileio import atomic_path, check_output_path, sha256_file
from lora_export.artifacts.plan_manifest import PlanManifest, now
from lora_export.contract import Slot, weight_names
from lora_export.engines import _trt
from lora_export.engines.refit_plan import (
    GraphWeights,
    RefitPlan,
    branched_refit_plan,
    changed_weights,
    merged_refit_plan,
)
from lora_export.errors import UserError

MAX_MISSING_ROUNDS = 4


@dataclass
class RefitResult:
    path: Path
    plan: RefitPlan
    refit_seconds: float  # Refitter creation .. refit_cuda_engine done
    total_seconds: float  # including planning, deserializing and writing the plan
    manifest: PlanManifest


def _load_graph_weights(entry: dict | None, what: str, override: Path | None = None) -> GraphWeights:
    if override is not None:
        path = Path(override)
    elif entry:
        path = Path(entry["path"])
    else:
        raise UserError(
            f"refit needs the {what}: pass --base BASE.onnx (a merged export without an adapter: "
            "lora-export merge-and-export MODEL -o BASE.onnx, no --adapter)"
        )
    if not path.exists():
        raise UserError(f"{what} {path} not found: pass --base BASE.onnx")
    if override is None and entry and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise UserError(f"{what} {path} changed since the engine was built (sha256 differs): pass --base explicitly")
    model = onnx.load(str(path))
    from lora_export.passes.quantize import refuse_quantized

    refuse_quantized(model, "refit")
    return GraphWeights(model)


def _source_if_present(entry: dict | None) -> GraphWeights | None:
    """The engine's source graph when it is still there unchanged (it is optional once a base graph is known)."""
    if not entry or not Path(entry["path"]).exists():
        return None
    if entry.get("sha256") and sha256_file(entry["path"]) != entry["sha256"]:
        return None
    return GraphWeights(onnx.load(str(entry["path"])))


def make_refit_plan(
    manifest: PlanManifest, adapter: Adapter | None, base: Path | None = None
) -> tuple[RefitPlan, GraphWeights | None]:
    """The weights to set for `adapter` (None = back to base) and the graph that supplies coupled weights."""
    if not manifest.refittable:
        raise UserError("this engine was built without --refit: rebuild it with build-engine --refit")
    previous = manifest.current_weights
    if manifest.lora_as == "weights":
        plan = branched_refit_plan(
            manifest.lora_modules, int(manifest.lora_rank), manifest.weights_dtype or "float32", adapter, previous or []
        )
        return plan, None
    if manifest.lora_as == "inputs":
        raise UserError(
            "this engine takes LoRA tensors as inputs: feed them per call (no refit needed), "
            "or rebuild with build-engine --lora-as weights --refit"
        )
    weights = _load_graph_weights(manifest.base_graph, "base graph", base)
    source = _source_if_present(manifest.source)  # the graph TensorRT saw: where a tie would show
    if previous is None:  # merged graph built without --base: find what its adapter changed
        source = source or _load_graph_weights(manifest.source, "source graph")
        previous = changed_weights(source, weights)
    return merged_refit_plan(weights, adapter, previous, engine=source), weights


def apply_refit(trt, engine, logger, plan: RefitPlan, supply: Callable[[str], np.ndarray | None]) -> float:
    """Refit `engine` in memory with `plan`; `supply(name)` gives values for coupled weights. Returns seconds."""
    t0 = time.perf_counter()
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    absent = sorted(set(plan.values) - refittable)
    if absent:
        raise UserError(
            f"{absent[0]} (and {len(absent) - 1} more) is not refittable in this engine "
            "(built without --refit, or the name is not a weight of the engine)"
        )
    keep = []  # the arrays must stay alive until refit_cuda_engine returns

    def set_one(name: str, value: np.ndarray) -> None:
        proto = refitter.get_weights_prototype(name)
        want = _trt.trt_dtype_to_numpy(trt, proto.dtype)
        value = np.ascontiguousarray(value)
        if value.dtype != want or value.size != proto.size:
            raise UserError(
                f"refit {name}: engine expects {proto.size} x {want}, computed {value.size} x {value.dtype} "
                "(was the engine built from this graph?)"
            )
        keep.append(value)
        if not refitter.set_named_weights(name, trt.Weights(value)):
            raise UserError(f"TensorRT rejected new weights for {name}")

    for name, value in plan.values.items():
        set_one(name, value)
    for _ in range(MAX_MISSING_ROUNDS):
        missing = list(refitter.get_missing_weights())
        if not missing:
            break
        for name in missing:  # weights TensorRT fused with ones we set: give their current (base) value
            value = supply(name)
            if value is None:
                raise UserError(f"refit needs weight {name} too, which the graph does not provide")
            set_one(name, value)
    missing = list(refitter.get_missing_weights())
    if missing:
        raise UserError(f"refit incomplete: TensorRT still misses {len(missing)} weights, e.g. {missing[0]}")
    if not refitter.refit_cuda_engine():
        raise UserError("TensorRT refit_cuda_engine failed (rerun with --log-level verbose)")
    return time.perf_counter() - t0


def graph_supplier(*graphs: GraphWeights | None) -> Callable[[str], np.ndarray | None]:
    def supply(name: str) -> np.ndarray | None:
        for g in graphs:
            if g is not None and name in g:
                return g.array(name)
        return None

    return supply


def lora_zero_supplier(manifest: PlanManifest, fallback: Callable[[str], np.ndarray | None]):
    """Branched weights engines: a LoRA weight outside the plan is neither old nor new adapter's, so zero."""
    shapes = {}
    rank = int(manifest.lora_rank or 0)
    for slot in map(Slot.from_dict, manifest.lora_modules):
        a_name, b_name = weight_names(slot.path)
        shapes[a_name], shapes[b_name] = (slot.in_features, rank), (rank, slot.out_features)
    dtype = np.dtype(manifest.weights_dtype or "float32")

    def supply(name: str) -> np.ndarray | None:
        return np.zeros(shapes[name], dtype) if name in shapes else fallback(name)

    return supply


def refit_engine(
    plan_path: str | Path,
    adapter: Adapter | None,
    *,
    out: str | Path | None = None,
    in_place: bool = False,
    base: str | Path | None = None,
    force: bool = False,
    log_level: str = "warning",
) -> RefitResult:
    """Refit `plan_path` to `adapter` (None: the base model); write `out` (or the plan itself) + manifest."""
    t_start = time.perf_counter()
    plan_path = Path(plan_path)
    if not plan_path.exists():
        raise UserError(f"{plan_path} does not exist: build an engine first (build-engine --refit)")
    if in_place == (out is not None):
        raise UserError("give either -o NEW.plan or --in-place")
    target = plan_path if in_place else check_output_path(out, force)
    manifest = PlanManifest.read(plan_path)
    trt = _trt.load_tensorrt()
    plan, weights = make_refit_plan(manifest, adapter, Path(base) if base else None)
    logger = _trt.make_logger(trt, log_level)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise UserError(
            f"TensorRT {trt.__version__} cannot load {plan_path} (built with TensorRT {manifest.tensorrt}?)"
        )
    supply = graph_supplier(weights)
    if manifest.lora_as == "weights":
        source = _load_graph_weights(manifest.base_graph or manifest.source, "source graph")
        supply = lora_zero_supplier(manifest, graph_supplier(source))
    seconds = apply_refit(trt, engine, logger, plan, supply)
    data = bytes(memoryview(engine.serialize()))
    with atomic_path(target, suffix=".plan") as tmp:
        tmp.write_bytes(data)
    manifest.current_adapter = (
        None
        if adapter is None
        else {
            "name": adapter.name,
            "source": adapter.source,
            "sha256": adapter.sha256,
            "weights": plan.adapted,
        }
    )
    manifest.refits.append(
        {"adapter": adapter.name if adapter else None, **plan.summary(), "seconds": round(seconds, 4), "at": now()}
    )
    manifest.write(target)
    return RefitResult(target, plan, seconds, time.perf_counter() - t_start, manifest)

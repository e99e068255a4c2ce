"""The default optimization pipeline, and `optimize_file` (what the CLI and the benchmarks call).

    Cleanup -> FoldLoraScale -> [BakeAdapter] -> [FuseSiblingBranches] -> Cleanup -> [OrtFusion]
            -> [Float16 -> Cleanup]

After every pass the LoRA name contract is checked against the input graph (`contract.check_preserved`);
a violation is a bug in a pass and raises `ContractError` before anything is written.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from lora_export.adapters.adapter import Adapter
from lora_export.errors import UserError
from lora_export.passes.bake import BakeAdapterPass
from lora_export.passes.cleanup import CleanupPass
from lora_export.passes.contract import (
    check_preserved,
    count_ops,
    lora_inputs,
    lora_node_count,
    snapshot,
)
from lora_export.passes.fp16 import Float16Pass
from lora_export.passes.ort_fusion import OrtFusionPass, guess_arch
from lora_export.passes.scale_fold import FoldLoraScalePass
from lora_export.passes.sibling_fusion import FuseSiblingBranchesPass

TARGETS = ("ort",)


@dataclass
class Step:
    """One pass of the pipeline and what `check_preserved` may allow once it has run."""

    pass_: ir.passes.PassBase
    lora_removed: bool = False
    weights_changed: bool = False
    dtype_changed: bool = False


@dataclass
class PipelineOptions:
    bake: Adapter | None = None
    fp16: bool = False
    target: str | None = None
    fuse_siblings: bool = False
    arch: str | None = None
    allow_nonfinite: bool = False


def default_steps(opts: PipelineOptions) -> list[Step]:
    if opts.target is not None and opts.target not in TARGETS:
        raise UserError(f"unknown --target {opts.target!r}: choose one of {', '.join(TARGETS)}")
    baked = opts.bake is not None
    steps = [Step(CleanupPass()), Step(FoldLoraScalePass())]
    if baked:
        steps.append(Step(BakeAdapterPass(opts.bake, allow_nonfinite=opts.allow_nonfinite), True, True))
    if opts.fuse_siblings and not baked:
        steps.append(Step(FuseSiblingBranchesPass()))
    steps.append(Step(CleanupPass(), baked, baked))
    if opts.target == "ort":  # fuse first: the fusers match float32 patterns, not ones broken up by Casts
        steps.append(Step(OrtFusionPass(opts.arch), baked, baked))
    if opts.fp16:
        steps += [Step(Float16Pass(), baked, baked, True), Step(CleanupPass(), baked, baked, True)]
    return steps


def graph_stats(model: ir.Model) -> dict[str, Any]:
    init_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return {
        "nodes": len(model.graph),
        "ops": count_ops(model),
        "initializers": len(model.graph.initializers),
        "initializer_bytes": int(init_bytes),
        "lora_inputs": len(lora_inputs(model)),
        "lora": lora_node_count(model),
    }


def optimize_model(model: ir.Model, opts: PipelineOptions | None = None) -> tuple[ir.Model, dict[str, Any]]:
    """Run the default pipeline on `model` (in place where passes allow); returns (model, report)."""
    opts = opts or PipelineOptions()
    opts.arch = opts.arch or guess_arch(model)
    before = snapshot(model)
    report: dict[str, Any] = {"before": graph_stats(model), "passes": [], "notes": []}
    for step in default_steps(opts):
        t0 = time.perf_counter()
        result = step.pass_(model)
        model = result.model
        check_preserved(
            before,
            model,
            lora_removed=step.lora_removed,
            weights_changed=step.weights_changed,
            dtype_changed=step.dtype_changed,
        )
        notes = list(getattr(step.pass_, "notes", []))
        report["passes"].append(
            {
                "pass": type(step.pass_).__name__,
                "modified": bool(result.modified),
                "seconds": round(time.perf_counter() - t0, 3),
                "notes": notes,
            }
        )
        report["notes"] += notes
    if before.lora and not opts.bake:
        report["notes"].append("scale: already folded into the fed B inputs (the contract); nothing to fold")
    report["after"] = graph_stats(model)
    return model, report


def optimize_file(
    in_path: str | Path,
    out_path: str | Path,
    *,
    bake: str | Path | Adapter | None = None,
    fp16: bool = False,
    target: str | None = None,
    force: bool = False,
    fuse_siblings: bool = False,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Optimize the graph at `in_path` into `out_path` (+ `out_path.json` manifest); returns the report.

    `bake`: an adapter (PEFT dir, `.onnx_adapter`/`.safetensors`/`.npz` file, or `Adapter`) folded into the
    weights: the result is a merged graph. Nothing is written if any step fails.
    """
    from lora_export.adapters.peft_io import read_adapter
    from lora_export.export.trace import save
    from lora_export.fileio import check_output_path, manifest_path, read_json, write_json

    in_path = Path(in_path)
    if not in_path.is_file():
        raise UserError(f"{in_path} does not exist: give an exported .onnx graph")
    out_path = check_output_path(out_path, force)
    try:
        model = ir.load(in_path)
    except Exception as e:  # onnx raises DecodeError and friends
        raise UserError(f"cannot read {in_path} as ONNX: {str(e).splitlines()[0][:200]}") from None
    adapter = bake
    if bake is not None and not isinstance(bake, Adapter):
        adapter = read_adapter(bake, allow_nonfinite=allow_nonfinite)
    source_manifest = read_json(manifest_path(in_path)) if manifest_path(in_path).is_file() else None
    arch = (source_manifest or {}).get("model", {}).get("arch")
    opts = PipelineOptions(
        bake=adapter, fp16=fp16, target=target, fuse_siblings=fuse_siblings, arch=arch, allow_nonfinite=allow_nonfinite
    )
    model, report = optimize_model(model, opts)
    report["input"], report["output"] = str(in_path), str(out_path)
    report["options"] = {
        "bake": None if adapter is None else adapter.name,
        "fp16": fp16,
        "target": target,
        "fuse_siblings": fuse_siblings,
    }
    save(model, out_path)
    write_json(manifest_path(out_path), _manifest(source_manifest, model, report, adapter, fp16))
    report["output_bytes"] = out_path.stat().st_size
    return report


def _manifest(source: dict | None, model: ir.Model, report: dict, adapter: Adapter | None, fp16: bool) -> dict:
    from lora_export.export.manifest import value_info

    manifest = copy.deepcopy(source) if source else {"kind": "unknown"}
    inputs = [value_info(v) for v in model.graph.inputs]
    manifest["inputs"] = [i for i in inputs if ".lora_" not in i["name"] and i["name"] != "adapter_index"]
    manifest["lora_inputs"] = [i for i in inputs if ".lora_" in i["name"]]
    manifest["outputs"] = [value_info(v) for v in model.graph.outputs]
    if adapter is not None:
        manifest["kind"] = "merged"
        manifest["adapters"] = [*manifest.get("adapters", []), adapter.summary()]
        for key in ("layout", "lora_modules", "max_rank", "no_adapter_index"):
            manifest.pop(key, None)
    if fp16:
        manifest["dtype"] = "fp16"
    manifest["optimized"] = {
        "source": report["input"],
        "options": report["options"],
        "passes": [p["pass"] for p in report["passes"]],
        "notes": report["notes"],
        "nodes": {"before": report["before"]["nodes"], "after": report["after"]["nodes"]},
        "lora_nodes": {"before": report["before"]["lora"], "after": report["after"]["lora"]},
        "initializer_bytes": {
            "before": report["before"]["initializer_bytes"],
            "after": report["after"]["initializer_bytes"],
        },
    }
    return manifest


def graph_feeds(path: str | Path, batch: int, seq: int, *, seed: int = 0, rank: int = 8) -> dict[str, Any]:
    """Feeds for timing a graph without its model: token ids < 100, a full attention mask, and for an
    inputs-layout graph random LoRA tensors of `rank` (so the branch does work); bank graphs keep their
    defaults (no adapter, `adapter_index` -1)."""
    import numpy as np

    from lora_export.runtime.slots import GraphSlots

    model = ir.load(path)
    rng = np.random.default_rng(seed)
    slots = GraphSlots.from_onnx(path)
    feeds: dict[str, Any] = {}
    for v in model.graph.inputs:
        if v.const_value is not None:
            continue
        name = v.name
        if name == "adapter_index":
            feeds[name] = np.full((batch,), -1, dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), dtype=np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), dtype=np.int64)
        elif v.dtype == ir.DataType.INT64:
            feeds[name] = rng.integers(0, 100, size=(batch, seq), dtype=np.int64)
        else:
            np_dtype = np.float16 if v.dtype == ir.DataType.FLOAT16 else np.float32
            feeds[name] = rng.standard_normal((batch, seq)).astype(np_dtype)
    if slots.layout == "inputs":
        for path_, slot in slots.modules.items():
            a = rng.standard_normal((slot.in_features, rank)) / np.sqrt(slot.in_features)
            b = rng.standard_normal((rank, slot.out_features)) * 0.01
            feeds[f"{path_}.lora_A.weight"] = a.astype(slots.dtype)
            feeds[f"{path_}.lora_B.weight"] = b.astype(slots.dtype)
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
    `lora_export.verify.latency.measure`; returns stats by name and the `Measurement` under `_measurement`."""
    from lora_export.backends.onnxrt import OrtRunner
    from lora_export.verify.latency import Candidate, measure

    candidates = []
    for name, path in graphs.items():
        runner = OrtRunner(path, threads=threads, spinning=False).__enter__()  # spinning off: see session_options
        feed_sets = [graph_feeds(path, batch, seq, seed=s) for s in range(3)]
        candidates.append(Candidate.from_runner(name, runner, feed_sets, tokens=batch * seq))
    candidates += list(extra or [])
    result = measure(candidates, warmup=warmup, iters=iters)
    return {s.name: s.to_dict(samples=False) for s in result.stats} | {"_measurement": result}

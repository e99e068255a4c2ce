"""The default optimization pipeline, and `optimize_file` (what the CLI and the benchmarks call).

    Cleanup -> FoldLoraScale -> [BakeAdapter] -> [FuseSiblingBranches] -> Cleanup -> [OrtFusion]
            -> [TransformerFusion] -> [Float16 -> Cleanup] -> [QuantizeBase]

Every pass is a `LoraPass`: it checks the LoRA name contract against its own input graph when it runs
(onnx-ir `requires` / `ensures`); a violation is a bug in a pass and raises `ContractError` before anything
is written. The written graph's manifest is the source's, with its I/O and slots read from the new graph.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from lora_export.adapters.adapter import Adapter
from lora_export.contract import GraphManifest
from lora_export.errors import UserError
from lora_export.passes.bake import BakeAdapterPass
from lora_export.passes.cleanup import CleanupPass
from lora_export.passes.contract import count_ops, lora_inputs, lora_node_count
from lora_export.passes.fp16 import Float16Pass
from lora_export.passes.ort_fusion import OrtFusionPass, guess_arch
from lora_export.passes.quantize import QuantizeBasePass, check_scheme
from lora_export.passes.scale_fold import FoldLoraScalePass
from lora_export.passes.sibling_fusion import FuseSiblingBranchesPass
from lora_export.passes.transformer_fusion import TransformerFusionPass, parse_fusions

TARGETS = ("ort",)


@dataclass
class PipelineOptions:
    bake: Adapter | None = None
    fp16: bool = False
    target: str | None = None
    fuse_siblings: bool = False
    arch: str | None = None
    allow_nonfinite: bool = False
    fuse: tuple[str, ...] = ()  # TransformerFusionPass groups (`transformer_fusion.FUSION_GROUPS`)
    quantize: str | None = None  # int8 | int8-block | int4 (`quantize.SCHEMES`)
    block_size: int | None = None


def default_steps(opts: PipelineOptions) -> list[ir.passes.PassBase]:
    if opts.target is not None and opts.target not in TARGETS:
        raise UserError(f"unknown --target {opts.target!r}: choose one of {', '.join(TARGETS)}")
    baked = opts.bake is not None
    steps: list[ir.passes.PassBase] = [CleanupPass(), FoldLoraScalePass()]
    if baked:
        steps.append(BakeAdapterPass(opts.bake, allow_nonfinite=opts.allow_nonfinite))
    if opts.fuse_siblings and not baked:
        steps.append(FuseSiblingBranchesPass())
    steps.append(CleanupPass())
    if opts.target == "ort":  # fuse first: the fusers match float32 patterns, not ones broken up by Casts
        steps.append(OrtFusionPass(opts.arch))
    if opts.fuse:
        steps.append(TransformerFusionPass(opts.fuse))
    if opts.fp16:
        steps += [Float16Pass(), CleanupPass()]
    if opts.quantize:
        check_scheme(opts.quantize, opts.block_size)
        if opts.fp16:
            raise UserError("--quantize replaces float32 base weights: drop --fp16 (the LoRA branches stay float32)")
        steps.append(QuantizeBasePass(opts.quantize, block_size=opts.block_size))
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
    had_lora = bool(lora_inputs(model))
    report: dict[str, Any] = {"before": graph_stats(model), "passes": [], "notes": []}
    for step in default_steps(opts):
        t0 = time.perf_counter()
        result = step(model)  # the pass checks the contract itself (LoraPass.requires / ensures)
        model = result.model
        notes = list(getattr(step, "notes", []))
        entry = {
            "pass": type(step).__name__,
            "modified": bool(result.modified),
            "seconds": round(time.perf_counter() - t0, 3),
            "notes": notes,
        }
        if isinstance(step, TransformerFusionPass):  # what each fusion did: --report prints the counts
            entry["fusions"] = report["fusions"] = {k: v for k, v in step.counts.items() if v}
        if isinstance(step, QuantizeBasePass):
            entry["quantization"] = report["quantization"] = step.summary
        report["passes"].append(entry)
        report["notes"] += notes
    if had_lora and not opts.bake:
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
    fuse: str | tuple[str, ...] | None = (),
    quantize: str | None = None,
    block_size: int | None = None,
) -> dict[str, Any]:
    """Optimize the graph at `in_path` into `out_path` (+ `out_path.json` manifest); returns the report.

    `bake`: an adapter (PEFT dir, `.onnx_adapter`/`.safetensors`/`.npz` file, or `Adapter`) folded into the
    weights: the result is a merged graph. `fuse`: transformer fusion groups ("all", "none", or a comma list,
    see `transformer_fusion`); `quantize`: int8 | int8-block | int4 base weights (`quantize`), `block_size`
    for the blockwise schemes. A decoder folder (`export-decoder`) in gives a folder out, its adapters and
    configs copied. Nothing is written if any step fails.
    """
    from lora_export.artifacts.fileio import all_or_nothing, check_output_path
    from lora_export.artifacts.onnxio import read_manifest, write_manifest
    from lora_export.export.trace import save
    from lora_export.models.sources import open_adapter

    in_path = Path(in_path)
    fuse = parse_fusions(fuse) if fuse else ()
    check_scheme(quantize, block_size)
    if in_path.is_dir():
        from lora_export.passes.folder import optimize_folder

        kw = dict(fp16=fp16, target=target, fuse_siblings=fuse_siblings, allow_nonfinite=allow_nonfinite)
        return optimize_folder(
            in_path,
            out_path,
            optimize_file,
            bake=bake,
            force=force,
            fuse=fuse,
            quantize=quantize,
            block_size=block_size,
            **kw,
        )
    if not in_path.is_file():
        raise UserError(f"{in_path} does not exist: give an exported .onnx graph or a decoder folder")
    out_path = check_output_path(out_path, force)
    try:
        model = ir.load(in_path)
    except Exception as e:  # onnx raises DecodeError and friends
        raise UserError(f"cannot read {in_path} as ONNX: {str(e).splitlines()[0][:200]}") from None
    adapter = bake
    if bake is not None:
        adapter = open_adapter(bake, allow_nonfinite=allow_nonfinite)
    source_manifest = read_manifest(in_path)
    arch = source_manifest.model.get("arch") if source_manifest is not None else None
    opts = PipelineOptions(
        bake=adapter,
        fp16=fp16,
        target=target,
        fuse_siblings=fuse_siblings,
        arch=arch,
        allow_nonfinite=allow_nonfinite,
        fuse=fuse,
        quantize=quantize,
        block_size=block_size,
    )
    model, report = optimize_model(model, opts)
    report["input"], report["output"] = str(in_path), str(out_path)
    report["options"] = {
        "bake": None if adapter is None else adapter.name,
        "fp16": fp16,
        "target": target,
        "fuse_siblings": fuse_siblings,
        "fuse": list(fuse),
        "quantize": quantize,
        "block_size": block_size,
    }
    with all_or_nothing() as files:  # the graph and its manifest, or neither
        files += save(model, out_path)
        write_manifest(out_path, rewritten_manifest(source_manifest, model, report, adapter, fp16))
    report["output_bytes"] = out_path.stat().st_size
    return report


def rewritten_manifest(
    source: GraphManifest | None, model: ir.Model, report: dict, adapter: Adapter | None, fp16: bool
) -> GraphManifest:
    """The source graph's manifest, updated for the optimized `model`: I/O and slots are read from the new
    graph (a bank graph keeps its adapter index among the inputs), a bake makes it a merged graph."""
    from lora_export.artifacts.onnxio import graph_io, slots_of_ir

    manifest = copy.deepcopy(source) if source is not None else GraphManifest(kind="unknown")
    manifest.set_io(*graph_io(model))
    manifest.set_slots(slots_of_ir(model))
    if adapter is not None:
        manifest.kind = "merged"
        manifest.adapters = [*manifest.adapters, adapter.summary()]
    if fp16:
        manifest.dtype = "fp16"
    manifest.optimized = {
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
    if report.get("fusions") is not None:
        manifest.optimized["fusions"] = report["fusions"]
    if report.get("quantization"):
        manifest.quantization = report["quantization"]
    return manifest

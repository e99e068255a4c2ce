"""Benchmark of the optimization passes, ONNX Runtime CPU, everything interleaved in one process.

Its command line is `tools/bench_passes.py`.

Measures (medians of interleaved runs, `lora_export.bench.latency.measure`):

1. optimized branched graph vs the unoptimized branched graph (adapter r=8 on c_attn fed to both);
2. optimized merged graph (default pipeline, and with `--target ort`) vs PyTorch eager on the same merged
   weights (goal >= 3x) and vs the plain merged graph;
3. sibling-branch fusion on a Llama-shaped graph (q_proj + v_proj): LoRA MatMuls and nodes in our graph, the
   nodes ONNX Runtime actually runs (its optimized graph, i.e. kernels), and latency fused vs unfused.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PassesBenchOptions:
    model: str = "sample:gpt2-small"
    sibling_model: str = "sample:llama"
    batch: int = 1
    seq: int = 128
    iters: int = 40
    warmup: int = 5
    command: str = ""  # recorded in the output


def ort_kernel_count(path: Path, out: Path) -> int:
    """Nodes in ONNX Runtime's own optimized graph (ORT_ENABLE_ALL, CPU): what it launches per run."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return len(onnx.load(str(out), load_external_data=False).graph.node)


def run_passes_bench(args: PassesBenchOptions, work: Path) -> dict:
    """Every measurement of the module docstring, as one JSON-able dict (progress on stderr)."""
    import onnx_ir as ir
    import torch

    from lora_export.adapters.spec import DEFAULT_TARGETS, LoraSpec
    from lora_export.adapters.synthetic import random_adapter
    from lora_export.backends.torch_runner import TorchRunner
    from lora_export.bench.graph_timing import measure_graphs
    from lora_export.bench.latency import Candidate
    from lora_export.bench.standard_graphs import export_standard_graphs
    from lora_export.bench.sweep import merged_copy
    from lora_export.export.branched import export_branched
    from lora_export.models import load_model
    from lora_export.passes.contract import lora_node_count
    from lora_export.passes.pipeline import optimize_file

    out: dict = {
        "command": args.command,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "model": args.model,
        "shape": f"batch {args.batch} seq {args.seq}",
    }
    print(f"exporting {args.model} ...", file=sys.stderr)
    loaded = load_model(args.model)
    adapter = random_adapter(loaded.module, LoraSpec(r=8, alpha=16, target_modules=["c_attn"]), seed=0, name="bench")
    export_standard_graphs(loaded, work, adapter, kinds=["branched", "merged"])
    for stem in ("branched", "merged"):
        rep = optimize_file(work / f"{stem}.onnx", work / f"{stem}.opt.onnx")
        out[f"{stem} nodes"] = f"{rep['before']['nodes']} -> {rep['after']['nodes']}"
    for stem in ("branched", "merged"):
        rep = optimize_file(work / f"{stem}.onnx", work / f"{stem}.ort.onnx", target="ort")
        out[f"{stem} --target ort"] = {
            "nodes": f"{rep['before']['nodes']} -> {rep['after']['nodes']}",
            "notes": [n for n in rep["notes"] if "target ort" in n],
        }

    eager = TorchRunner(merged_copy(loaded, adapter), None).__enter__()
    feed_sets = [{k: v.numpy() for k, v in loaded.make_inputs(args.batch, args.seq, s).items()} for s in range(3)]
    extra = [Candidate.from_runner("torch/eager merged", eager, feed_sets, tokens=args.batch * args.seq)]
    print("timing (interleaved) ...", file=sys.stderr)
    timing = measure_graphs(
        {
            "ort/branched": work / "branched.onnx",
            "ort/branched.opt": work / "branched.opt.onnx",
            "ort/branched.opt --target ort": work / "branched.ort.onnx",
            "ort/merged": work / "merged.onnx",
            "ort/merged.opt": work / "merged.opt.onnx",
            "ort/merged.opt --target ort": work / "merged.ort.onnx",
        },
        batch=args.batch,
        seq=args.seq,
        iters=args.iters,
        warmup=args.warmup,
        extra=extra,
    )
    m = timing.pop("_measurement")
    out["p50 ms"] = {k: round(v["p50"], 3) for k, v in timing.items()}
    out["ratios (median; paired)"] = {
        "branched.opt / branched": _r(m.ratio("ort/branched.opt", "ort/branched")),
        "branched.opt --target ort / branched": _r(m.ratio("ort/branched.opt --target ort", "ort/branched")),
        "merged.opt / merged": _r(m.ratio("ort/merged.opt", "ort/merged")),
        "torch eager / merged.opt (speedup)": _r(m.ratio("torch/eager merged", "ort/merged.opt")),
        "torch eager / merged.opt --target ort (speedup)": _r(
            m.ratio("torch/eager merged", "ort/merged.opt --target ort")
        ),
    }

    print(f"sibling fusion on {args.sibling_model} ...", file=sys.stderr)
    small = load_model(args.sibling_model)
    export_branched(small, work / "sib.onnx", targets=DEFAULT_TARGETS[small.arch])
    optimize_file(work / "sib.onnx", work / "sib.opt.onnx")
    optimize_file(work / "sib.onnx", work / "sib.fused.onnx", fuse_siblings=True)
    sib = {}
    for stem in ("sib.opt", "sib.fused"):
        model = ir.load(work / f"{stem}.onnx")
        sib[stem] = {
            **lora_node_count(model),
            "graph nodes": len(model.graph),
            "ORT kernels": ort_kernel_count(work / f"{stem}.onnx", work / f"{stem}.ort.onnx"),
        }
    t = measure_graphs(
        {"unfused": work / "sib.opt.onnx", "fused": work / "sib.fused.onnx"},
        batch=args.batch,
        seq=args.seq,
        iters=args.iters,
        warmup=args.warmup,
    )
    sm = t.pop("_measurement")
    sib["p50 ms"] = {k: round(v["p50"], 3) for k, v in t.items()}
    sib["fused / unfused"] = _r(sm.ratio("fused", "unfused"))
    out[f"sibling fusion ({args.sibling_model}, q_proj+v_proj)"] = sib
    eager.__exit__(None, None, None)
    return out


def _r(ratio) -> str:
    return f"{ratio.value:.3f}; {ratio.paired:.3f}" if ratio.paired is not None else f"{ratio.value:.3f}"

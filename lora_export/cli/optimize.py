"""optimize: LoRA-aware, name-preserving graph passes (lora_export.passes)."""

from __future__ import annotations

from pathlib import Path

import click

from lora_export import api
from lora_export.cli import display
from lora_export.cli.app import cli
from lora_export.cli.options import json_option, progress_steps, write_json_report


@cli.command("optimize")
@click.argument("graph", metavar="IN.onnx|FOLDER", type=click.Path())
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(), help="Output .onnx path (a folder for a folder)."
)
@click.option(
    "--bake",
    default=None,
    help="Fold this adapter (.onnx_adapter/.safetensors/.npz file or PEFT dir) into the weights: a merged graph.",
)
@click.option("--fp16", is_flag=True, help="Compute in float16; LayerNorm/Softmax/reductions and LoRA stay float32.")
@click.option(
    "--target",
    type=click.Choice(["ort"]),
    default=None,
    help="ort: ONNX Runtime transformer fusions, applied only if the LoRA slots survive them.",
)
@click.option(
    "--fuse-siblings",
    is_flag=True,
    help="One x·A MatMul for LoRA branches reading the same input (q/v); off by default (no faster on ORT CPU).",
)
@click.option(
    "--fuse",
    default="none",
    show_default=True,
    metavar="GROUPS",
    help="ONNX Runtime fusions on onnxscript's rewriter, LoRA branches untouched: all, none, or a comma list of "
    "norm, rotary, attention, gelu.",
)
@click.option(
    "--quantize",
    default=None,
    metavar="SCHEME",
    help="Quantize the base weights, LoRA branches stay float32: int8 (dynamic, per channel), int8-block or "
    "int4 (weight-only MatMulNBits).",
)
@click.option(
    "--block-size", type=int, default=None, help="--quantize int4/int8-block: input rows per scale [default: 32]."
)
@click.option("--report", "show_report", is_flag=True, help="Print ops by type, fusions and quantization before/after.")
@click.option("--bench", is_flag=True, help="Also time the graph before/after (ONNX Runtime CPU).")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="--bench batch size.")
@click.option("--seq-len", "seq_len", type=click.IntRange(1), default=128, show_default=True, help="--bench length.")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf in the baked weights.")
@json_option
@progress_steps
def optimize(
    graph,
    output,
    bake,
    fp16,
    target,
    fuse_siblings,
    fuse,
    quantize,
    block_size,
    show_report,
    bench,
    batch,
    seq_len,
    force,
    allow_nonfinite,
    json_path,
    steps,
):
    """Optimize an exported graph; LoRA inputs, their defaults and base weight names are kept exactly.

    \b
    Examples:
      lora-export optimize branched.onnx -o branched.opt.onnx --report --bench
      lora-export optimize branched.onnx -o merged.onnx --bake my.onnx_adapter
      lora-export optimize branched.onnx -o branched.fp16.onnx --fp16 --target ort
      lora-export optimize branched.onnx -o branched.int8.onnx --quantize int8 --fuse all --report
      lora-export optimize decoder/ -o decoder-int4/ --quantize int4 --block-size 32
    """
    folder = Path(graph).is_dir()
    report = api.optimize(
        graph,
        output,
        bench=bench,
        batch=batch,
        seq=seq_len,
        progress=steps,
        bake=bake,
        fp16=fp16,
        target=target,
        force=force,
        fuse_siblings=fuse_siblings,
        allow_nonfinite=allow_nonfinite,
        fuse=fuse,
        quantize=quantize,
        block_size=block_size,
    )
    b, a = report["before"], report["after"]
    wrote = f"{output}/" if folder else f"{output} (+ {click.format_filename(output)}.json)"
    display.out.print(
        f"wrote {wrote}: {b['nodes']} -> {a['nodes']} nodes, LoRA inputs {b['lora_inputs']} -> {a['lora_inputs']}"
    )
    for note in report["notes"]:
        display.out.print(f"note: {note}")
    if show_report:
        _print_report(report)
    if bench:
        timing = {k: v for k, v in report["bench"].items() if k != "ratio_after_before"}
        r = report["bench"]["ratio_after_before"]
        display.table(
            "latency (ms)",
            ["graph", "p50", "p90", "p99"],
            [[k, v["p50"], v["p90"], v["p99"]] for k, v in timing.items()],
            caption=f"after/before median ratio {r['value']:.3f} (paired {r['paired']:.3f})",
        )
    write_json_report(json_path, report)


def _print_report(report: dict) -> None:
    b, a = report["before"], report["after"]
    ops = sorted(set(b["ops"]) | set(a["ops"]))
    rows = [[op, b["ops"].get(op, 0), a["ops"].get(op, 0)] for op in ops if b["ops"].get(op) or a["ops"].get(op)]
    rows.append(["total", b["nodes"], a["nodes"]])
    display.table("nodes by op type", ["op", "before", "after"], rows)
    display.table(
        "graph",
        ["", "before", "after"],
        [
            ["initializers", b["initializers"], a["initializers"]],
            ["initializer bytes", b["initializer_bytes"], a["initializer_bytes"]],
            ["LoRA inputs", b["lora_inputs"], a["lora_inputs"]],
            ["LoRA nodes", b["lora"]["nodes"], a["lora"]["nodes"]],
            ["LoRA MatMuls", b["lora"]["matmuls"], a["lora"]["matmuls"]],
        ],
    )
    display.table(
        "passes",
        ["pass", "modified", "seconds"],
        [[p["pass"], p["modified"], p["seconds"]] for p in report["passes"]],
    )
    if report.get("fusions") is not None:
        rows = [[name, count] for name, count in report["fusions"].items()] or [["(nothing matched)", 0]]
        display.table("fusions (TransformerFusionPass)", ["fused", "count"], rows)
    q = report.get("quantization")
    if q:
        display.table(
            "quantization (QuantizeBasePass)",
            ["", ""],
            [
                ["scheme", q["scheme"] + (f", block size {q['block_size']}" if q.get("block_size") else "")],
                ["method", q["method"]],
                ["MatMuls quantized", q["nodes_quantized"]],
                ["weights quantized", len(q["weights_quantized"])],
                ["LoRA nodes (branches + joins) kept float32", q["lora_nodes_kept_float"]],
                ["quantized ops", ", ".join(f"{k} x{v}" for k, v in q["quantized_ops"].items())],
                ["initializer bytes", f"{q['initializer_bytes']['before']} -> {q['initializer_bytes']['after']}"],
            ],
        )

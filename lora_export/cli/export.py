"""merge-and-export, export-branched, export-decoder: parse, call `lora_export.api`, display."""

from __future__ import annotations

import click

from lora_export import api
from lora_export.cli import display
from lora_export.cli.app import cli
from lora_export.cli.options import (
    bank_formulation_option,
    by_layer_option,
    export_options,
    model_argument,
    nonfinite_option,
    parse_targets,
    progress_steps,
    shape_options,
)


@cli.command("merge-and-export")
@model_argument
@click.option(
    "--adapter",
    "adapter",
    multiple=True,
    help="PEFT adapter directory (or adapter file). Without it, the plain base model is exported. "
    "One adapter: a merged graph holds one.",
)
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
@export_options
@shape_options
@nonfinite_option
@click.option("--no-verify", is_flag=True, help="Skip the parity check against the PyTorch reference.")
@by_layer_option
@progress_steps
def merge_and_export(
    model, adapter, output, opset, dtype, force, batch, seq_len, allow_nonfinite, no_verify, by_layer, steps
):
    """Fold the adapter into the weights (W0 + s·B·A, fp32) and export ONNX; then verify it."""
    outcome = api.merge_and_export(
        model,
        list(adapter),
        output,
        verify=not no_verify,
        verify_by_layer=by_layer,
        allow_nonfinite=allow_nonfinite,
        progress=steps,
        opset=opset,
        dtype=dtype,
        force=force,
        batch=batch,
        seq=seq_len,
    )
    display.out.print(f"wrote {outcome.export.path} (+ {outcome.export.path.name}.json)")
    if outcome.report is not None:
        _finish(outcome.report)


@cli.command("export-branched")
@model_argument
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="PEFT adapter(s): their modules get LoRA slots (and the first is used to verify). Repeatable.",
)
@click.option(
    "--targets",
    default=None,
    help="Comma-separated module names (or one regex) to give LoRA slots, "
    "when no --adapter is given. Default: the architecture's PEFT defaults.",
)
@click.option(
    "--layout",
    type=click.Choice(["inputs", "bank"]),
    default="inputs",
    show_default=True,
    help="inputs: one adapter per call via named graph inputs. bank: per-row adapters in one batch.",
)
@click.option(
    "--max-rank",
    type=click.IntRange(1),
    default=None,
    help="bank: largest adapter rank (default max(16, ranks of the given adapters)).",
)
@click.option(
    "--dora",
    is_flag=True,
    help="Give every slot a DoRA scale input (automatic when an --adapter uses DoRA), so DoRA adapters load later.",
)
@click.option(
    "--modules-to-save",
    "modules_to_save",
    default=None,
    help="Comma-separated modules (e.g. classifier) whose parameters become adapter inputs, as PEFT's "
    "modules_to_save (automatic for the --adapter's own).",
)
@bank_formulation_option
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False))
@export_options
@shape_options
@click.option("--no-verify", is_flag=True)
@by_layer_option
@progress_steps
def export_branched(
    model,
    adapters,
    targets,
    layout,
    max_rank,
    dora,
    modules_to_save,
    bank_formulation,
    output,
    opset,
    dtype,
    force,
    batch,
    seq_len,
    no_verify,
    by_layer,
    steps,
):
    """Export with the LoRA side branch kept in the graph: swap adapters at run time, or mix them per row."""
    outcome = api.export_branched(
        model,
        output,
        adapters=list(adapters),
        verify=not no_verify,
        verify_by_layer=by_layer,
        progress=steps,
        targets=parse_targets(targets),
        layout=layout,
        max_rank=max_rank,
        opset=opset,
        dtype=dtype,
        force=force,
        batch=batch,
        seq=seq_len,
        dora=dora,
        saved_modules=[m.strip() for m in modules_to_save.split(",") if m.strip()] if modules_to_save else None,
        bank_formulation=bank_formulation,
    )
    result = outcome.export
    display.out.print(f"wrote {result.path}: {len(result.manifest.lora_modules)} LoRA slots, layout {layout}")
    if outcome.report is not None:
        _finish(outcome.report)


@cli.command("export-decoder")
@model_argument
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="PEFT adapter(s). merged: the one folded in; inputs/bank: packed into DIR/adapters/NAME.onnx_adapter "
    "(NAME = the adapter directory's name) and their modules get the LoRA slots. Repeatable.",
)
@click.option(
    "--layout",
    type=click.Choice(["merged", "inputs", "bank"]),
    default="merged",
    show_default=True,
    help="merged: one adapter folded in. inputs: one adapter per call by name. bank: per-row adapters in a batch.",
)
@click.option("--targets", default=None, help="inputs/bank without --adapter: modules to give LoRA slots.")
@click.option("--max-rank", type=click.IntRange(1), default=None, help="bank: largest adapter rank (default 16).")
@bank_formulation_option
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=click.IntRange(18, 30), default=None, help="ONNX opset (default: the exporter's).")
@click.option(
    "--fused/--unfused",
    "fused",
    default=None,
    help="fused: the ONNX Runtime GenAI builder's graph (GroupQueryAttention, packed q/k/v, in-place KV cache) with "
    "our LoRA branches (bank: gathered per row); exit 2 where it cannot be written. unfused: the traced graph. "
    "Default: fused where it can be written (a Llama/Mistral/Qwen2/Qwen3/Phi-3 model directory with a tokenizer, "
    "no DoRA or modules_to_save, fp32), else traced, saying why. Both run under lora-export generate/serve; "
    "merged and inputs folders also under ONNX Runtime GenAI.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "int4", "int8"]),
    default="fp32",
    show_default=True,
    help="--fused: the base weights (int4: MatMulNBits, block 32, accuracy level 4, lm_head included); the LoRA "
    "branches stay fp32.",
)
@click.option("--force", is_flag=True, help="Replace the output folder if it holds a previous export.")
@click.option("--no-verify", is_flag=True, help="Skip the greedy generation check against transformers generate.")
@progress_steps
def export_decoder(
    model,
    output,
    adapters,
    layout,
    targets,
    max_rank,
    bank_formulation,
    dtype,
    opset,
    fused,
    precision,
    force,
    no_verify,
    steps,
):
    """A causal LM with its KV cache -> a folder ONNX Runtime GenAI and `generate` run (model.onnx,
    genai_config.json, adapters/, tokenizer); then checks greedy tokens against transformers generate."""
    outcome = api.export_decoder(
        model,
        output,
        adapters=list(adapters),
        layout=layout,
        verify=not no_verify,
        progress=steps,
        targets=parse_targets(targets),
        max_rank=max_rank,
        bank_formulation=bank_formulation,
        dtype=dtype,
        opset=opset,
        force=force,
        fused=fused,
        precision=precision,
    )
    result, facts = outcome.export, outcome.export.facts
    if result.note:
        display.out.print(result.note)
    display.out.print(
        f"wrote {result.path}: {facts.num_layers} layers, {facts.num_key_value_heads} KV heads x {facts.head_size}, "
        f"vocab {facts.vocab_size}, context {facts.context_length}, layout {layout}"
        + (f", adapters {', '.join(result.adapters)}" if result.adapters else "")
        + (f", fused ({result.manifest.extra['fused']['precision']})" if "fused" in result.manifest.extra else "")
    )
    if outcome.report is not None:
        display.finish_generation_report(outcome.report)


def _finish(report) -> None:
    display.parity_table(report)
    if not report.passed:
        raise click.exceptions.Exit(1)
    display.out.print("[green]verified[/green]: the graph matches the PyTorch reference")

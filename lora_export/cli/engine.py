"""build-engine, refit: thin commands over `lora_export.engines` (TensorRT is imported only when they run)."""

from __future__ import annotations

import click

from lora_export.cli import display
from lora_export.cli.app import cli
from lora_export.cli.options import nonfinite_option, progress_steps

LOG_LEVELS = ["verbose", "info", "warning", "error"]


@cli.command("build-engine")
@click.argument("onnx_path", metavar="IN.onnx", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Output OUT.plan.")
@click.option(
    "--shapes",
    "shapes",
    multiple=True,
    help="Profile NAME:MIN,OPT,MAX, NAME an input (input_ids:1x1,1x128,8x512) or a dynamic dim "
    "(batch:1,1,8, sequence:1,128,512, r:0,8,64). Repeatable; defaults come from the graph's dynamic dims.",
)
@click.option("--refit", is_flag=True, help="Build a refittable engine (REFIT) so `refit` can swap adapters.")
@click.option(
    "--lora-as",
    "lora_as",
    type=click.Choice(["inputs", "weights"]),
    default="inputs",
    show_default=True,
    help="Branched graphs: LoRA tensors as engine inputs (per-call adapters), or as zero weights to refit.",
)
@click.option(
    "--lora-rank",
    type=click.IntRange(1),
    default=None,
    help="Rank R of the LoRA weights (--lora-as weights; default 16).",
)
@click.option(
    "--base",
    "base",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Base graph (merge-and-export without --adapter) whose weights refits of a merged engine start from.",
)
@click.option(
    "--timing-cache", type=click.Path(dir_okay=False), default=None, help="Timing cache file, loaded and saved."
)
@click.option("--workspace", "workspace_mb", type=click.IntRange(1), default=None, help="Workspace memory limit, MiB.")
@click.option(
    "--log-level", type=click.Choice(LOG_LEVELS), default="warning", show_default=True, help="TensorRT log level."
)
@click.option("--force", is_flag=True, help="Overwrite OUT.plan if it exists.")
@progress_steps
def build_engine(
    onnx_path, output, shapes, refit, lora_as, lora_rank, base, timing_cache, workspace_mb, log_level, force, steps
):
    """Build a TensorRT engine (TensorRT 10 or 11) from an exported graph; writes OUT.plan and OUT.plan.json.

    Precision comes from the graph: export or optimize to fp16 first (TensorRT 11 has no FP16 flag;
    on TensorRT 10 an fp16 graph is built strongly typed).
    """
    from pathlib import Path

    from lora_export.engines.build import BuildOptions
    from lora_export.engines.build import build_engine as build

    options = BuildOptions(
        shapes=list(shapes),
        refit=refit,
        timing_cache=Path(timing_cache) if timing_cache else None,
        workspace_mb=workspace_mb,
        log_level=log_level,
        lora_as=lora_as,
        lora_rank=lora_rank,
        base_graph=Path(base) if base else None,
    )
    with steps("building the TensorRT engine"):
        result = build(onnx_path, output, options, force=force, progress=lambda msg: display.err.print(f"  {msg}"))
    m = result.manifest
    flags = ", ".join(m.flags.get("network_flags", []) + m.flags.get("builder_flags", [])) or "none"
    rows = [[p["name"], *("x".join(map(str, p[k])) for k in ("min", "opt", "max"))] for p in m.profiles]
    caption = (
        f"TensorRT {m.tensorrt}, {m.source['precision']}, flags: {flags}, "
        f"{len(m.refittable_weights)} refittable weights, built in {result.seconds:.1f}s"
    )
    display.table(f"engine {result.path}", ["input", "min", "opt", "max"], rows, caption=caption)
    display.out.print(f"wrote {result.path} (+ {result.path.name}.json)")


@cli.command("refit")
@click.argument("plan", metavar="OUT.plan", type=click.Path(dir_okay=False))
@click.option("--adapter", "adapter", default=None, help="PEFT adapter dir or adapter file; omit with --base-model.")
@click.option("--base-model", "to_base", is_flag=True, help="Refit back to the base model (no adapter).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None, help="Write NEW.plan.")
@click.option("--in-place", is_flag=True, help="Rewrite OUT.plan itself.")
@click.option(
    "--base", "base", type=click.Path(dir_okay=False, exists=True), default=None, help="Base graph (merged engines)."
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="warning", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite NEW.plan if it exists.")
@nonfinite_option
@progress_steps
def refit(plan, adapter, to_base, output, in_place, base, log_level, force, allow_nonfinite, steps):
    """Swap the adapter inside a refittable engine: W0 + s·B·A (merged) or A, B (branched --lora-as weights).

    Weights the previous adapter changed and the new one does not go back to base (a refit only replaces the
    weights it is given, so the previous adapter's would otherwise stay).
    """
    from lora_export import api
    from lora_export.errors import UserError

    if (adapter is None) == (not to_base):
        raise UserError("give --adapter DIR|FILE, or --base-model to go back to the base weights")
    result = api.refit(
        plan,
        adapter,
        allow_nonfinite=allow_nonfinite,
        progress=steps,
        out=output,
        in_place=in_place,
        base=base,
        force=force,
        log_level=log_level,
    )
    s = result.plan.summary()
    display.out.print(
        f"refit {result.path}: {s['adapted']} weights adapted, {s['restored']} restored to base, "
        f"refit {result.refit_seconds:.3f}s (total {result.total_seconds:.1f}s)"
    )

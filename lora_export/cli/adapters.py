"""make-adapter, pack-adapter."""

from __future__ import annotations

import click

from lora_export import api
from lora_export.cli import display
from lora_export.cli.app import cli
from lora_export.cli.options import model_argument, nonfinite_option, parse_targets


@cli.command("make-adapter")
@model_argument
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(file_okay=False), help="Directory for the PEFT adapter."
)
@click.option("--r", "r", type=click.IntRange(1), default=8, show_default=True, help="Rank.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="lora_alpha.")
@click.option(
    "--targets", default=None, help="Comma-separated module names (default: the architecture's PEFT defaults)."
)
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r) (rsLoRA).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True)
def make_adapter(model, output, r, alpha, targets, rslora, seed, force):
    """Write a random PEFT-format adapter (non-zero B) for MODEL."""
    adapter = api.make_adapter(
        model,
        output,
        r=r,
        alpha=alpha,
        seed=seed,
        use_rslora=rslora,
        force=force,
        targets=parse_targets(targets),
    )
    display.out.print(
        f"wrote {output}: {len(adapter.modules)} modules, r={r}, alpha={alpha:g}, "
        f"{adapter.num_parameters():,} parameters"
    )


@cli.command("pack-adapter")
@click.argument("adapter", metavar="ADAPTER")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False),
    help="X.onnx_adapter (ONNX Runtime), X.safetensors or X.npz.",
)
@click.option(
    "--graph",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Check the adapter fits this branched graph's LoRA inputs before writing.",
)
@click.option(
    "--dtype", type=click.Choice(["fp32", "fp16"]), default=None, help="Default: the --graph's LoRA dtype, else fp32."
)
@click.option("--force", is_flag=True)
@nonfinite_option
def pack_adapter(adapter, output, graph, dtype, force, allow_nonfinite):
    """A PEFT adapter -> contract-layout adapter file ([in, r] A, [r, out] B with the scaling folded)."""
    ad = api.as_adapter(adapter, allow_nonfinite=allow_nonfinite)
    path = api.pack_adapter(ad, output, dtype=dtype, graph=graph, force=force)
    ranks = sorted(set(ad.ranks().values()))
    display.out.print(f"wrote {path}: {len(ad.modules)} modules, ranks {ranks}")

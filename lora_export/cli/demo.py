"""demo: the trained sample and its two adapters as one bank folder, generated and scored."""

from __future__ import annotations

import click

from lora_export import api
from lora_export.cli import display
from lora_export.cli.app import cli
from lora_export.cli.options import progress_steps


@cli.command("demo")
@click.option(
    "-o",
    "--output-dir",
    "out_dir",
    default="lora-export-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="The demo's folder; a rerun replaces it (a non-empty folder the demo did not write is refused).",
)
@click.option("--items", type=click.IntRange(1, 200), default=40, show_default=True, help="Test items scored per row.")
@progress_steps
def demo(out_dir, items, steps):
    """The trained sample (tiny GPT-2, synthetic restaurant data) and its two LoRA adapters as one ONNX bank
    folder: base model and both adapters generate for the same input, checked against PyTorch, then scored."""
    result = api.demo(out_dir, items=items, progress=steps)
    display.demo_summary(result)
    if not result.matches_torch:
        raise click.exceptions.Exit(1)

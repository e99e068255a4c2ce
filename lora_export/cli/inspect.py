"""inspect: parse, call `lora_export.api.inspect`, display."""

from __future__ import annotations

import click

from lora_export import api
from lora_export.cli import display
from lora_export.cli.app import cli
from lora_export.cli.options import echo_json


@cli.command("inspect")
@click.argument("target", metavar="MODEL|ADAPTER|GRAPH.onnx|DECODER_DIR")
@click.option(
    "--model", "base_model", default=None, help="For an adapter: the base model, to report the trainable fraction."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(target, base_model, as_json):
    """Adapted modules, ranks, scaling, parameter counts and the trainable fraction; for a graph or a decoder
    folder its layout, shape, LoRA slots, packed adapters and ops."""
    info = api.inspect(target, base_model=base_model)
    if as_json:
        echo_json(info)
        return
    table = info.pop("table", [])
    summary = {k: v for k, v in info.items() if not isinstance(v, (list, dict))}
    display.table(f"{info['kind']}: {target}", ["field", "value"], [[k, v] for k, v in summary.items()])
    if table:
        display.table(
            "modules",
            list(table[0]),
            [list(r.values()) for r in table[:200]],
            caption=f"{len(table)} rows" + (" (first 200)" if len(table) > 200 else ""),
        )

"""inspect."""

from __future__ import annotations

from pathlib import Path

import click

from lora_export import api
from lora_export.cli import cli, display
from lora_export.cli.options import echo_json


@cli.command("inspect")
@click.argument("target", metavar="MODEL|ADAPTER|GRAPH.onnx")
@click.option(
    "--model", "base_model", default=None, help="For an adapter: the base model, to report the trainable fraction."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(target, base_model, as_json):
    """Adapted modules, ranks, scaling, parameter counts and the trainable fraction."""
    from lora_export import inspection as insp
    from lora_export.adapters.spec import DEFAULT_TARGETS

    path = Path(target)
    if path.suffix == ".onnx":
        info = insp.inspect_onnx(path)
    elif not target.startswith(("sample:", "py:")) and (path.is_file() or (path / "adapter_config.json").exists()):
        base = sum(p.numel() for p in api.as_model(base_model).module.parameters()) if base_model else None
        info = insp.inspect_adapter(api.as_adapter(path, allow_nonfinite=True), base)
    else:
        loaded = api.as_model(target)
        info = insp.inspect_model(loaded.module, loaded.arch, loaded.source, DEFAULT_TARGETS.get(loaded.arch))
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

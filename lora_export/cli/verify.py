"""verify."""

from __future__ import annotations

import click

from lora_export import api
from lora_export.cli import cli, display
from lora_export.cli.options import (
    json_option,
    model_argument,
    nonfinite_option,
    parse_ints,
    parse_per_output,
    parse_shapes,
    progress_steps,
    write_json_report,
)


@cli.command("verify")
@model_argument
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="The exported graph.")
@click.option(
    "--adapter", "adapters", multiple=True, help="Adapter(s): one for merged/inputs graphs, several for bank."
)
@click.option("--atol", multiple=True, help="Absolute tolerance, NAME:VALUE or VALUE for all outputs. Repeatable.")
@click.option("--rtol", multiple=True, help="Relative tolerance, NAME:VALUE or VALUE. Repeatable.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated input seeds.")
@click.option("--shapes", default=None, help="BATCHxSEQ list, e.g. 2x16,3x7,1x23 (the default).")
@click.option("--provider", "providers", multiple=True, help="ONNX Runtime execution provider(s).")
@click.option("--no-effect-check", is_flag=True, help="Do not require the adapter to visibly change the outputs.")
@json_option
@nonfinite_option
@progress_steps
def verify(
    model, onnx_path, adapters, atol, rtol, seeds, shapes, providers, no_effect_check, json_path, allow_nonfinite, steps
):
    """Compare ONNX Runtime on the graph with the PyTorch reference (adapter unmerged, PEFT's semantics).

    Exit code 0 when every output on every input set is within tolerance, 1 otherwise.
    """
    with steps(f"loading {model}"):
        loaded = api.as_model(model)
        ads = [api.as_adapter(a, allow_nonfinite=allow_nonfinite) for a in adapters]
    with steps("running ONNX Runtime and PyTorch"):
        report = api.verify(
            loaded,
            onnx_path,
            adapters=ads,
            atol=parse_per_output(atol, "--atol"),
            rtol=parse_per_output(rtol, "--rtol"),
            seeds=parse_ints(seeds, "--seeds"),
            shapes=parse_shapes(shapes),
            providers=list(providers) or None,
            check_effect=not no_effect_check,
        )
    write_json_report(json_path, report.to_dict())
    display.parity_table(report)
    if not report.passed:
        display.err.print("[red]verification failed[/red]")
        raise click.exceptions.Exit(1)
    display.out.print("[green]verified[/green]")

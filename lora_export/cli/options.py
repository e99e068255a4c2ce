"""Option bundles shared by commands (decorators, as in simonw/llm), and small output helpers."""

from __future__ import annotations

import functools
import json

import click

from lora_export.contract import BANK_FORMULATIONS, DENSE
from lora_export.errors import UserError


def model_argument(f):
    return click.argument("model", metavar="MODEL")(f)


def shape_options(f):
    f = click.option(
        "--batch",
        type=click.IntRange(1),
        default=2,
        show_default=True,
        help="Batch size of the example inputs used to trace.",
    )(f)
    f = click.option(
        "--seq-len",
        "seq_len",
        type=click.IntRange(2),
        default=16,
        show_default=True,
        help="Sequence length (image size for image models) of the example inputs.",
    )(f)
    return f


def export_options(f):
    f = click.option(
        "--opset", type=click.IntRange(18, 30), default=None, help="ONNX opset (default: the exporter's)."
    )(f)
    f = click.option(
        "--dtype",
        type=click.Choice(["fp32", "fp16", "bf16"]),
        default="fp32",
        show_default=True,
        help="Weights and compute precision (bf16 graphs need a GPU runtime: ONNX Runtime CPU cannot run them).",
    )(f)
    f = click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")(f)
    return f


def nonfinite_option(f):
    return click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf in adapter weights.")(f)


def by_layer_option(f):
    return click.option(
        "--by-layer/--whole-model",
        "by_layer",
        default=None,
        help="Verify piece by piece (PyTorch module by module from the checkpoint, ONNX Runtime in pieces of the "
        "graph) or the whole model at once; default: by layer only when the weights would not fit in the memory "
        "available. The report says which ran.",
    )(f)


def json_option(f):
    return click.option(
        "--json",
        "json_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Also write the report as JSON to this path.",
    )(f)


def parse_per_output(values: tuple[str, ...], flag: str) -> dict[str, float]:
    """`logits:1e-4` -> {"logits": 1e-4}; a bare number applies to every output ("*")."""
    out = {}
    for v in values:
        name, _, num = v.rpartition(":")
        try:
            out[name or "*"] = float(num)
        except ValueError:
            raise UserError(f"{flag} {v!r}: expected NAME:NUMBER or NUMBER") from None
    return out


def parse_targets(value: str | None) -> list[str] | str | None:
    """`q_proj,v_proj` -> a list (PEFT: suffix match); anything with regex syntax stays one regex (full match)."""
    if not value:
        return None
    if any(c in value for c in "*[]()|\\^$+?"):
        return value
    return [t.strip() for t in value.split(",") if t.strip()]


def parse_shapes(value: str | None) -> list[tuple[int, int]] | None:
    """`2x16,3x7` -> [(2, 16), (3, 7)]."""
    if not value:
        return None
    shapes = []
    for part in value.split(","):
        b, _, s = part.strip().partition("x")
        try:
            shapes.append((int(b), int(s)))
        except ValueError:
            raise UserError(f"--shapes {part!r}: expected BATCHxSEQ, e.g. 2x16,3x7") from None
    return shapes


def parse_ints(value: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected comma-separated integers") from None


def write_json_report(path: str | None, data: dict) -> None:
    if path:
        from lora_export.artifacts.fileio import probe_writable, write_json

        probe_writable(path)
        write_json(path, data)


def echo_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def progress_steps(f):
    """Pass a `step(label)` context manager that shows a spinner on stderr while a slow step runs."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from lora_export.cli.display import Steps

        with Steps() as steps:
            return f(*args, steps=steps, **kwargs)

    return wrapper


bank_formulation_option = click.option(
    "--bank-formulation",
    type=click.Choice(list(BANK_FORMULATIONS)),
    default=DENSE,
    show_default=True,
    help="bank: how each row's branch is computed from the same inputs. dense: one matmul over every adapter's "
    "rank slots (fastest with few distinct adapters per batch); gather: each row's own A and B (cost per row "
    "independent of the number of adapters; for many adapters per batch). A fused bank graph always gathers.",
)

"""verify: one backend against another on seeded inputs and shapes, per-output tolerances, adapter effect."""

from __future__ import annotations

from pathlib import Path

import click

from lora_export import api
from lora_export.artifacts.fileio import probe_writable
from lora_export.cli import display
from lora_export.cli.app import cli
from lora_export.cli.options import (
    by_layer_option,
    json_option,
    model_argument,
    nonfinite_option,
    parse_ints,
    parse_per_output,
    parse_shapes,
    write_json_report,
)
from lora_export.errors import UserError
from lora_export.verify.options import BackendCheck, GenerationCheck, TaskCheck

BACKEND_CHOICES = click.Choice(["torch", "ort", "trt"])


def sweep_shapes(shapes: str | None, batches: str | None, seqs: str | None) -> list[tuple[int, int]] | None:
    """`--shapes 2x16,3x7`, plus the cartesian product of `--batch` x `--seq-len` lists when given."""
    out = list(parse_shapes(shapes) or [])
    if batches or seqs:
        bs = parse_ints(batches or "2", "--batch")
        ss = parse_ints(seqs or "16", "--seq-len")
        out += [(b, s) for b in bs for s in ss]
    bad = [f"{b}x{s}" for b, s in out if b < 1 or s < 1]
    if bad:
        raise UserError(f"shapes {', '.join(bad)}: batch and sequence length must be at least 1")
    return out or None


@cli.command("verify")
@model_argument
@click.option(
    "--onnx",
    "onnx_path",
    type=click.Path(),
    default=None,
    help="The exported graph (ort), or a decoder folder (export-decoder): then greedy generation is checked.",
)
@click.option("--engine", "engine_path", type=click.Path(dir_okay=False), default=None, help="A TensorRT plan (trt).")
@click.option("--reference", type=BACKEND_CHOICES, default="torch", show_default=True, help="Reference backend.")
@click.option(
    "--candidate", type=BACKEND_CHOICES, default=None, help="Candidate backend [default: trt with --engine, else ort]."
)
@click.option(
    "--adapter", "adapters", multiple=True, help="Adapter(s): one for merged/inputs graphs, several for bank."
)
@click.option("--atol", multiple=True, help="Absolute tolerance, NAME:VALUE or VALUE for all outputs. Repeatable.")
@click.option("--rtol", multiple=True, help="Relative tolerance, NAME:VALUE or VALUE. Repeatable.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated input seeds.")
@click.option("--shapes", default=None, help="BATCHxSEQ list, e.g. 2x16,3x7,1x23 (the default).")
@click.option("--batch", "batches", default=None, help="Shape sweep: comma list of batch sizes (x --seq-len).")
@click.option("--seq-len", "seqs", default=None, help="Shape sweep: comma list of sequence lengths (x --batch).")
@click.option("--provider", "providers", multiple=True, help="ONNX Runtime execution provider(s).")
@click.option("--no-effect-check", is_flag=True, help="Do not require the adapter to visibly change the outputs.")
@click.option(
    "--oracle",
    type=click.Choice(["auto", "peft", "lora-export"]),
    default="auto",
    show_default=True,
    help="Whose LoRA the torch reference runs: PEFT itself (auto: when installed) or lora-export's own layer.",
)
@click.option(
    "--save-inputs",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory to keep failing cases in (inputs and both outputs, .npz) for reproduction.",
)
@click.option(
    "--new-tokens", type=click.IntRange(1), default=16, show_default=True, help="Decoder folders: tokens per prompt."
)
@click.option(
    "--task",
    type=click.Choice(["e2e"]),
    default=None,
    help="Score the decoder folder --onnx on the trained sample's task (model sample:e2e): BLEU / ROUGE-L / "
    "METEOR per adapter next to PyTorch + PEFT on the same items (at most 64 new tokens, greedy).",
)
@click.option("--split", type=click.Choice(["dev", "test"]), default=None, help="--task: the data split [test].")
@click.option("--limit", type=click.IntRange(1), default=None, help="--task: score the first N items only.")
@click.option(
    "--tolerance",
    type=click.FloatRange(0),
    default=None,
    help="--task: score points (0-100) a quantized or fp16 folder may differ from PEFT [1.0]; "
    "an fp32 folder must generate PEFT's text exactly.",
)
@by_layer_option
@json_option
@nonfinite_option
def verify(
    model,
    onnx_path,
    engine_path,
    reference,
    candidate,
    adapters,
    atol,
    rtol,
    seeds,
    shapes,
    batches,
    seqs,
    providers,
    no_effect_check,
    oracle,
    save_inputs,
    new_tokens,
    task,
    split,
    limit,
    tolerance,
    by_layer,
    json_path,
    allow_nonfinite,
):
    """Compare two backends (default: ONNX Runtime on --onnx against PyTorch with the adapter unmerged).

    Backends: torch (PEFT's own forward, PeftModel.from_pretrained on the base model, when peft is installed;
    else lora-export's LoRA layer; the report names the reference), ort (--onnx), trt (--engine; its LoRA slots
    come from --onnx).
    Exit code 0 when every output on every input set is within tolerance and the adapter visibly changes
    the outputs, 1 otherwise; 3 when TensorRT or a GPU is missing.

    With --task e2e: task scores of a decoder folder of sample:e2e vs PyTorch + PEFT; exit 1 when an fp32
    folder's text differs from PEFT's, or a quantized folder's score differs by more than --tolerance.
    """
    if task is not None:
        if onnx_path is None:
            raise UserError(f"--task {task} scores a decoder folder: pass --onnx FOLDER (written by export-decoder)")
        check = TaskCheck(task=task, split=split or "test", limit=limit, tolerance=tolerance)
        return _verify_task(model, onnx_path, adapters, check, json_path)
    given = [flag for flag, v in (("--split", split), ("--limit", limit), ("--tolerance", tolerance)) if v is not None]
    if given:
        need = "needs" if len(given) == 1 else "need"
        raise UserError(f"{', '.join(given)} {need} --task: add --task e2e (and --onnx DECODER_FOLDER)")
    if onnx_path is not None and Path(onnx_path).is_dir():
        tol = parse_per_output(atol, "--atol")
        generation = GenerationCheck(
            new_tokens=new_tokens,
            shapes=parse_shapes(shapes),
            seeds=parse_ints(seeds, "--seeds"),
            atol=next(iter(tol.values()), None),
        )
        return _verify_generation(model, onnx_path, adapters, generation, json_path, allow_nonfinite)
    candidate = candidate or ("trt" if engine_path else "ort")
    if "ort" in (reference, candidate) and onnx_path is None:
        raise UserError("the ort backend needs the graph: pass --onnx PATH")
    if "trt" in (reference, candidate) and engine_path is None:
        raise UserError("the trt backend needs an engine: pass --engine PLAN (see build-engine)")
    probe_writable(json_path)  # a report that cannot be written fails now, not after the run
    check = BackendCheck(
        reference=reference,
        candidate=candidate,
        onnx_path=onnx_path,
        engine_path=engine_path,
        atol=parse_per_output(atol, "--atol"),
        rtol=parse_per_output(rtol, "--rtol"),
        seeds=parse_ints(seeds, "--seeds"),
        shapes=sweep_shapes(shapes, batches, seqs),
        providers=list(providers) or None,
        check_effect=not no_effect_check,
        oracle=oracle,
        by_layer=by_layer,
        save_inputs=save_inputs,
    )
    _verify_backends(model, adapters, check, json_path, allow_nonfinite)


def _verify_backends(model, adapters, check: BackendCheck, json_path, allow_nonfinite) -> None:
    """One backend against another on seeded inputs and shapes."""
    label = f"{check.candidate} vs {check.reference}"
    with display.progress_bars() as progress:
        report = api.verify(
            model,
            adapters=list(adapters),
            allow_nonfinite=allow_nonfinite,
            check=check,
            on_case=lambda d, n: progress(label, d, n),
        )
    write_json_report(json_path, report.to_dict())
    display.parity_table(report)
    if report.artifacts:
        display.err.print(f"failing inputs kept in {check.save_inputs} ({len(report.artifacts)} files)")
    if not report.passed:
        display.err.print("[red]verification failed[/red]")
        raise click.exceptions.Exit(1)
    display.out.print("[green]verified[/green]")


def _verify_generation(model, folder, adapters, check: GenerationCheck, json_path, allow_nonfinite) -> None:
    """Greedy tokens of a decoder folder vs transformers generate (shapes: ROWSxLONGEST_PROMPT)."""
    report = api.verify_generation(model, folder, adapters=list(adapters), allow_nonfinite=allow_nonfinite, check=check)
    write_json_report(json_path, report.to_dict())
    display.finish_generation_report(report)


def _verify_task(model, folder, adapters, check: TaskCheck, json_path) -> None:
    """--task: the folder's task scores next to PyTorch + PEFT's on the same items."""
    with display.Steps() as steps:
        report = api.verify_task(model, folder, adapters=list(adapters), check=check, progress=steps)
    write_json_report(json_path, report.to_dict())
    display.task_table(report)
    if not report.passed:
        display.err.print("[red]task check failed[/red]")
        raise click.exceptions.Exit(1)
    display.out.print(f"[green]verified[/green]: {report.mode} ({_criterion(report)})")


def _criterion(report) -> str:
    if report.mode == "exact":
        return "the same text as PyTorch + PEFT on every item" + (", ties excepted" if _ties(report) else "")
    return f"every score within {report.tolerance:g} points of PyTorch + PEFT"


def _ties(report) -> int:
    return sum(len(c.ties) for c in report.comparisons)

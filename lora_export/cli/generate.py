"""export-decoder, generate."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lora_export import api
from lora_export.cli import display
from lora_export.cli.app import cli
from lora_export.cli.options import model_argument, parse_ints, parse_targets, progress_steps
from lora_export.errors import UserError


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
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=click.IntRange(18, 30), default=None, help="ONNX opset (default: the exporter's).")
@click.option("--force", is_flag=True, help="Replace the output folder if it holds a previous export.")
@click.option("--no-verify", is_flag=True, help="Skip the greedy generation check against transformers generate.")
@progress_steps
def export_decoder(model, output, adapters, layout, targets, max_rank, dtype, opset, force, no_verify, steps):
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
        dtype=dtype,
        opset=opset,
        force=force,
    )
    result, facts = outcome.export, outcome.export.facts
    display.out.print(
        f"wrote {result.path}: {facts.num_layers} layers, {facts.num_key_value_heads} KV heads x {facts.head_size}, "
        f"vocab {facts.vocab_size}, context {facts.context_length}, layout {layout}"
        + (f", adapters {', '.join(result.adapters)}" if result.adapters else "")
    )
    if outcome.report is not None:
        finish_generation_report(outcome.report)


def finish_generation_report(report) -> None:
    rows = [
        [
            c.label,
            " ".join(str(n) for n in c.prompt_lengths),
            sum(m is None for m in c.first_mismatch),
            len(c.first_mismatch),
            c.max_logits_err,
            c.atol,
            c.agreement,
            c.effect,
            "[green]pass[/green]" if c.passed else f"[red]FAIL[/red] {c.reason}",
        ]
        for c in report.cases
    ]
    display.table(
        f"generation: {report.new_tokens} greedy tokens vs transformers generate",
        [
            "case",
            "prompt lengths",
            "rows exact",
            "rows",
            "max logits err",
            "logits atol",
            "token agreement",
            "adapter effect",
            "result",
        ],
        rows,
    )
    tolerances = [c.tolerance for c in report.cases if c.tolerance]
    if tolerances:
        from lora_export.verify.tolerance import Tolerance

        loosest = max(tolerances, key=lambda t: t["atol"])
        display.out.print(
            f"logits tolerance (fp32, from the logits' scale and noise): {Tolerance(**loosest).describe()}"
        )
    if not report.passed:
        display.err.print("[red]generation check failed[/red]")
        raise click.exceptions.Exit(1)
    if report.quantization:
        worst = min(c.agreement for c in report.cases)
        display.out.print(
            f"[green]verified[/green] ({report.quantization} base): greedy-token agreement >= {worst:.3f}"
        )
        return
    display.out.print("[green]verified[/green]: token-exact with transformers generate")


@cli.command("generate")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--prompt", default=None, help="Prompt text (needs the tokenizer files in the folder).")
@click.option("--prompt-ids", default=None, help="Prompt token ids, comma-separated: 1,2,3.")
@click.option(
    "--adapter", default=None, help="An adapter of the folder (adapters/NAME.onnx_adapter) by NAME, or a PATH to load."
)
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible tokens).")
@click.option("--stop-ids", default=None, help="Extra stop token ids, comma-separated.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the model's eos token.")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: tokens, text, timings.")
def generate(
    folder,
    prompt,
    prompt_ids,
    adapter,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    stop_ids,
    ignore_eos,
    threads,
    as_json,
):
    """Generate from a decoder folder; streams the text (or ids) as it comes, --json for tokens and timings."""
    from lora_export.runtime.generator import Generator

    if (prompt is None) == (prompt_ids is None):
        raise UserError("give --prompt TEXT or --prompt-ids 1,2,3 (one of them)")
    with Generator(folder, threads=threads) as gen:
        ids = gen.encode(prompt) if prompt is not None else parse_ints(prompt_ids, "--prompt-ids")
        name = _adapter_name(gen, adapter)
        knobs = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=tuple(parse_ints(stop_ids, "--stop-ids")) if stop_ids else (),
            ignore_eos=ignore_eos,
        )
        if as_json:
            result = gen.generate(ids, adapter=name, **knobs)
            tokens = result.tokens[0]
            report = {
                "prompt_ids": ids,
                "adapter": name,
                **result.to_dict(),
                "tokens": tokens,
                "finish_reason": result.finish_reasons[0],
                "tokens_per_s": 1e3 / result.ms_per_token if result.ms_per_token else None,
            }
            del report["finish_reasons"]
            if prompt is not None:
                report["text"] = gen.decode(tokens)
            click.echo(json.dumps(report))
            return
        _stream(gen, ids, name, knobs, text=prompt is not None)


def _adapter_name(gen, adapter: str | None) -> str | None:
    if adapter is None:
        return None
    if adapter in gen.adapters():
        return adapter
    path = Path(adapter)
    if path.exists():
        name = path.stem if path.is_file() else path.name
        gen.load_adapter(name, path)
        return name
    have = ", ".join(gen.adapters()) or "none"
    raise UserError(f"no adapter named {adapter!r} in {gen.folder.path} (have: {have}) and no such path")


def _stream(gen, ids, name, knobs, *, text: bool) -> None:
    tokens: list[int] = []
    shown = ""
    for event in gen.stream(ids, adapter=name, **knobs):
        tokens.append(event.token)
        if text:
            now = gen.decode(tokens)
            if now.startswith(shown) and not now.endswith("\ufffd"):  # wait for a whole character
                click.echo(now[len(shown) :], nl=False)
                shown = now
        else:
            click.echo(f"{event.token} ", nl=False)
    click.echo("")

"""generate: text from a decoder folder (ONNX Runtime, our generator)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lora_export.cli.app import cli
from lora_export.cli.options import parse_ints
from lora_export.errors import UserError


@cli.command("generate")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--prompt", default=None, help="Prompt text (needs the tokenizer files in the folder).")
@click.option("--prompt-ids", default=None, help="Prompt token ids, comma-separated: 1,2,3.")
@click.option("--chat", is_flag=True, help="--prompt is a user message: apply the folder's chat template to it.")
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
    chat,
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
    if chat and prompt is None:
        raise UserError("--chat templates a text message: give it as --prompt TEXT")
    with Generator(folder, threads=threads) as gen:
        if chat:
            ids = gen.encode_chat([{"role": "user", "content": prompt}])
        else:
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

"""The `lora-export` Click group that every command module registers on (`from lora_export.cli.app import cli`).

A `UserError` anywhere becomes one line on stderr and its exit code (2 bad input, 1 verification failed, 3
missing TensorRT/GPU); other exceptions are bugs.
"""

from __future__ import annotations

import click

from lora_export import __version__
from lora_export.errors import UserError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: the file being written was discarded (outputs are renamed into place only when complete)",
                err=True,
            )
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="lora-export")
def cli() -> None:
    """Export PyTorch models with LoRA adapters to ONNX, merged or branched; optimize; build TensorRT
    engines; verify parity against PyTorch/PEFT semantics; benchmark.

    MODEL is a local transformers directory, py:package.module:factory, or sample:NAME
    (gpt2, llama, bert, gpt2-small, gpt2-medium, convnet).
    """

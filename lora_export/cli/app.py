"""The `lora-export` Click group that every command module registers on (`from lora_export.cli.app import cli`).

A `UserError` anywhere becomes one line on stderr and its exit code (2 bad input, 1 verification failed, 3
missing TensorRT/GPU), as does an `OSError` from the file system (a read-only or full disk, no permission:
exit 2); other exceptions are bugs. `--verbose` adds the traceback of the user's own code that failed (a
`py:` factory, the exporter on their model).
"""

from __future__ import annotations

import sys
import traceback

import click

from lora_export import __version__
from lora_export.errors import UserError
from lora_export.fileio import io_error_line


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if ctx.params.get("verbose") and e.__cause__ is not None:  # the user's code failing: its traceback
                traceback.print_exception(e.__cause__, file=sys.stderr)
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:
            if e.errno is None:  # not the file system or the OS refusing: a bug, keep the traceback
                raise
            if ctx.params.get("verbose"):
                traceback.print_exception(e, file=sys.stderr)
            click.echo(f"error: {io_error_line(e)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: the file being written was discarded (outputs are renamed into place only when complete)",
                err=True,
            )
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="lora-export")
@click.option(
    "--verbose", is_flag=True, help="On an error in your own code (a py: factory, the exporter), show its traceback."
)
def cli(verbose: bool) -> None:
    """Export PyTorch models with LoRA adapters to ONNX, merged or branched; optimize; build TensorRT
    engines; verify parity against PyTorch/PEFT semantics; benchmark.

    MODEL is a local transformers directory, py:package.module:factory, or sample:NAME
    (gpt2, llama, bert, gpt2-small, gpt2-medium, convnet).
    """

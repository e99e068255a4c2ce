"""The `lora-export` Click group that every command module registers on (`from lora_export.cli.app import cli`).

A `UserError` anywhere becomes one line on stderr and its exit code (2 bad input, 1 verification failed, 3
missing TensorRT/GPU), as does an `OSError` from the file system (a read-only or full disk, no permission:
exit 2); Click's usage errors (unknown option, missing argument, bad value) become one line in the same
`error: ...` style, exit 2; other exceptions are bugs. Third-party progress bars, log lines and warnings stay
off the terminal unless `--verbose` comes before the command; `--verbose` also adds the traceback of the
user's own code that failed (a `py:` factory, the exporter on their model).
"""

from __future__ import annotations

import sys
import traceback

import click

from lora_export import __version__
from lora_export.artifacts.fileio import io_error_line
from lora_export.errors import UserError
from lora_export.quiet import quiet_third_party


def error_line(message: str, *, from_click: bool = False) -> str:
    """`error: message`, the one style of every error the CLI prints. Click's sentences ("No such option:
    --x.") are put in ours (lower case start, no final period); our messages are printed as they are."""
    message = message.strip()
    if from_click:
        message = message.rstrip(".")
        if message[:1].isupper() and message[1:2].islower():
            message = message[0].lower() + message[1:]
    return f"error: {message}"


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "lora-export")
            click.echo(f"{error_line(e.format_message(), from_click=True)} (see '{where} --help')", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(error_line(e.format_message(), from_click=True), err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            with quiet_third_party(not ctx.params.get("verbose")):
                return super().invoke(ctx)
        except UserError as e:
            if ctx.params.get("verbose") and e.__cause__ is not None:  # the user's code failing: its traceback
                traceback.print_exception(e.__cause__, file=sys.stderr)
            click.echo(error_line(str(e)), err=True)
            ctx.exit(e.exit_code)
        except OSError as e:
            if e.errno is None:  # not the file system or the OS refusing: a bug, keep the traceback
                raise
            if ctx.params.get("verbose"):
                traceback.print_exception(e, file=sys.stderr)
            click.echo(error_line(io_error_line(e)), err=True)
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
    "-v",
    "--verbose",
    is_flag=True,
    help="Also show other libraries' progress bars, log lines and warnings, and the traceback of an error in "
    "your own code (a py: factory, the exporter).",
)
def cli(verbose: bool) -> None:
    """Export PyTorch models with LoRA adapters to ONNX, merged or branched; optimize; build TensorRT
    engines; verify parity against PyTorch/PEFT semantics; benchmark.

    MODEL is a local transformers directory, py:package.module:factory, or sample:NAME
    (gpt2, llama, qwen2, mistral, bert, gpt2-small, gpt2-medium, convnet; e2e is trained, with the adapters
    sample:e2e/description and sample:e2e/review).
    """

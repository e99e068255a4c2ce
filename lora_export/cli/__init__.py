"""`lora-export`: one thin Click command per stage; the stages hold the logic.

The group lives in `cli.app`; each command module registers itself on it (`from lora_export.cli.app import
cli`) and is imported here, so `lora_export.cli.cli` is the complete CLI.
"""

from __future__ import annotations

import sys

from lora_export.cli.app import cli


def _register() -> None:
    from lora_export.cli import (  # noqa: F401
        adapters,
        bench,
        demo,
        engine,
        export,
        generate,
        inspect,
        optimize,
        serve,
        verify,
    )


_register()


def main() -> None:
    cli(prog_name="lora-export")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

__all__ = ["cli", "main"]

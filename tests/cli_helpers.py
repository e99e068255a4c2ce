"""Running the CLI in-process and checking the one-line error contract."""

from __future__ import annotations

import re

from click.testing import CliRunner

from lora_export.cli import cli


def run(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def assert_one_line_error(result, pattern: str, code: int = 2):
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert re.search(pattern, lines[0]), lines[0]

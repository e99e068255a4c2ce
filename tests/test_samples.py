"""The samples a user copies keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def test_serve_many_adapters_sample(tmp_path, capsys):
    sys.path.insert(0, str(SAMPLES))
    try:
        import serve_many_adapters
    finally:
        sys.path.remove(str(SAMPLES))
    serve_many_adapters.main(["--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "legal: max |adapter - base|" in out and "mixed batch" in out


def test_shell_sample_parses():
    assert subprocess.run(["bash", "-n", str(SAMPLES / "peft_to_tensorrt.sh")]).returncode == 0

"""Benchmark of the optimization passes, ONNX Runtime CPU, everything interleaved in one process.

    python tools/bench_passes.py                       # sample:gpt2-small, batch 1, seq 128
    python tools/bench_passes.py --model sample:gpt2 --iters 10   # seconds: checks the script runs

What it measures: `lora_export.bench.passes` (this is its command line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lora_export.bench.passes import PassesBenchOptions, run_passes_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sample:gpt2-small")
    parser.add_argument("--sibling-model", default="sample:llama")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the graphs here (default: a temp dir, removed)"
    )
    args = parser.parse_args(argv)
    options = PassesBenchOptions(
        model=args.model,
        sibling_model=args.sibling_model,
        batch=args.batch,
        seq=args.seq,
        iters=args.iters,
        warmup=args.warmup,
        command="python tools/bench_passes.py " + " ".join(sys.argv[1:]),
    )
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        out = run_passes_bench(options, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_passes_") as tmp:  # GPT-2 small graphs: ~2 GB in all
            out = run_passes_bench(options, Path(tmp))
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

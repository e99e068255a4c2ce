"""Benchmark many adapters on one server: `lora-export serve --adapter-dir` over 1,000 registered PEFT adapters
(ranks 4..16), an LRU of 64 loaded ones, 32 closed-loop `openai` clients; one adapter vs uniform vs Zipf.

    python tools/bench_many_adapters.py                 # GPT-2 small shape; ~10 minutes on 2 cores
    python tools/bench_many_adapters.py --quick         # tiny sample model, 40 adapters: checks the script runs

The benchmark is `lora_export.bench.many_adapters` (its docstring lists what is measured and the goals); this is
its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_export.bench.many_adapters import ManyAdaptersOptions, run_many_adapters_bench


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ManyAdaptersOptions.workdir)
    parser.add_argument("--quick", action="store_true", help="tiny sample model, 40 adapters")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--cache", type=int, default=64, help="--max-cpu-adapters")
    parser.add_argument("--per-batch", type=int, default=None, help="--max-adapters-per-batch")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="per client, per load")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--check-rows", type=int, default=6, help="requests compared with PEFT generate")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="write the BENCHMARKS.md section here")
    args = parser.parse_args(argv)
    command = " ".join(["python", "tools/bench_many_adapters.py", *(argv or sys.argv[1:])])
    return run_many_adapters_bench(ManyAdaptersOptions(**vars(args), command=command))


if __name__ == "__main__":
    main()

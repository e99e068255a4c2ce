"""One huge prompt vs everyone else: small requests' p50/p99 on `lora-export serve`, alone and while another
client sends 5 MB text prompts back to back (alternating phases, pooled per phase).

    python tools/bench_serve_stall.py                                # 3 rounds × 20 s per phase, SmolLM2 (4 layers)
    python tools/bench_serve_stall.py --rounds 1 --seconds 5         # a quick check that it runs

The benchmark is `lora_export.bench.stall` (its docstring says what is sent and the goal); this is its command
line. Exit 1 when the goal is not met.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_export.bench.stall import StallOptions, run_stall_bench


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=StallOptions.workdir)
    parser.add_argument("--model", default=StallOptions.model, help="a model with a tokenizer")
    parser.add_argument("--big-mb", type=float, default=StallOptions.big_mb)
    parser.add_argument("--rounds", type=int, default=StallOptions.rounds)
    parser.add_argument("--seconds", type=float, default=StallOptions.seconds, help="each phase of each round")
    parser.add_argument("--new-tokens", type=int, default=StallOptions.new_tokens)
    parser.add_argument("--port", type=int, default=StallOptions.port)
    parser.add_argument("--json", type=Path, default=None)
    return run_stall_bench(StallOptions(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)

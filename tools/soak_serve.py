"""Soak `lora-export serve`: 64 closed-loop `openai` clients for 5 minutes over mixed adapters, 10 % bad requests
and 5 % streams dropped mid-way; then sampled replies replayed alone (cross-talk), replica RSS and open files.

    python tools/soak_serve.py                              # 5 minutes, the tiny sample model
    python tools/soak_serve.py --model sample:gpt2-small --seconds 600
    python tools/soak_serve.py --seconds 20 --warmup 5 --clients 8   # a quick check that it runs

The soak is `lora_export.bench.soak` (its docstring lists the requests and the goals); this is its command line.
Exit 1 when a goal is not met.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_export.bench.soak import SoakOptions, run_soak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=SoakOptions.workdir)
    parser.add_argument("--model", default=SoakOptions.model)
    parser.add_argument("--seconds", type=float, default=SoakOptions.seconds)
    parser.add_argument("--warmup", type=float, default=SoakOptions.warmup)
    parser.add_argument("--clients", type=int, default=SoakOptions.clients)
    parser.add_argument("--bad", type=float, default=SoakOptions.bad, help="share of bad requests")
    parser.add_argument("--disconnect", type=float, default=SoakOptions.disconnect, help="share of dropped streams")
    parser.add_argument("--new-tokens", type=int, default=SoakOptions.new_tokens)
    parser.add_argument("--replay", type=int, default=SoakOptions.replay, help="replies replayed alone")
    parser.add_argument("--port", type=int, default=SoakOptions.port)
    parser.add_argument("--json", type=Path, default=None)
    results = run_soak(SoakOptions(**vars(parser.parse_args(argv))))
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)

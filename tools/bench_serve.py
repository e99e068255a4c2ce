"""Benchmark `lora-export serve`: GPT-2 small shape decoder folder (bank layout, 4 random adapters), 64 new
tokens per request, greedy, clients with the official `openai` package.

    python tools/bench_serve.py                      # several minutes on 2 cores; prints a table, writes JSON
    python tools/bench_serve.py --quick              # tiny sample model, seconds: checks the script runs

The benchmark is `lora_export.bench.serve`; this is its command line. Measured, in one run:
- throughput (generated tokens/s over the wall time) and p50/p99 request latency for 1, 8 and 32 concurrent
  clients spread over the 4 adapters, on the batched server (--max-batch-size 32) and on the same server with
  --max-batch-size 1 (requests served one at a time);
- at 1 client, the server's request latency vs the in-process generator on the same folder (same prompts,
  same adapters; timed interleaved with the server requests, so machine drift hits both).

Goals: at 32 clients, batched >= 3x the throughput of --max-batch-size 1; at 1 client, server latency
<= 1.2x the in-process generator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_export.bench.serve import ServeBenchOptions, run_serve_bench


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora_export_bench_serve"))
    parser.add_argument("--quick", action="store_true", help="tiny sample model, few requests")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--per-client", default="4,2,2", help="requests each client sends, per concurrency level")
    parser.add_argument("--latency-iters", type=int, default=8, help="1-client requests timed vs in-process")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="write the BENCHMARKS.md serving section here")
    args = parser.parse_args(argv)
    command = " ".join(["python", "tools/bench_serve.py", *(argv or sys.argv[1:])])
    return run_serve_bench(ServeBenchOptions(**vars(args), command=command))


if __name__ == "__main__":
    main()

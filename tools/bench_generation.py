"""Generation benchmark: time to first token and ms/token of decoder folders, interleaved in one process.

Part of `tools/benchmarks.py` (which exports the folders and adds these goals to BENCHMARKS.md); the body is
`lora_export.bench.generation`. Run alone:

    python tools/bench_generation.py                         # GPT-2 small shape, 32-token prompt, 128 new tokens
    python tools/bench_generation.py --quick                 # the tiny sample: checks it runs

Candidates, each one whole greedy generation per call (eos ignored, so every call makes the same number of
tokens), timed together by `lora_export.bench.latency.measure` with per-token marks (`StepTimes`):

- batch 1: PyTorch `generate` with its KV cache; our merged decoder (IO binding, and plain numpy feeds for
  contrast); our inputs-layout decoder with an adapter; ONNX Runtime GenAI on the merged folder. The old path
  (the full-sequence graph re-run on the whole sequence for every token) is the contrast, timed apart with
  fewer rounds (it is several times slower).
- batch 4: the bank decoder with four adapters (one per row) vs the inputs decoder with one adapter.

ONNX Runtime sessions (ours and GenAI's) run with intra-op spinning off, as every timing in this project.
"""

from __future__ import annotations

import argparse

from lora_export.bench.generation import GenerationBench, report_lines, run_generation_bench, write_json


def main(argv: list[str] | None = None) -> GenerationBench:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Tiny sample, few tokens: checks it runs.")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--old-rounds", type=int, default=None, help="Rounds of the old path (default: rounds // 2).")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None, help="Keep the folders here (reused when they exist).")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    bench = run_generation_bench(
        quick=args.quick, rounds=args.rounds, old_rounds=args.old_rounds, threads=args.threads, workdir=args.workdir
    )
    print("\n".join(report_lines(bench)))
    if args.json_path:
        write_json(bench, args.json_path)
    return bench


if __name__ == "__main__":
    main()

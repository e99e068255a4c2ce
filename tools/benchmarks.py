"""The project's reference benchmark suite: every goal ratio the project set itself, measured in one process.

    python tools/benchmarks.py                # GPT-2 small shape, writes BENCHMARKS.md (several minutes)
    python tools/benchmarks.py --quick --out /tmp/b.md   # the tiny sample, seconds: checks the suite runs

What it measures, and how: `lora_export.bench.suite` (the suite; its reports `lora_export.bench.suite_report`).
This file is its command line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from lora_export.bench.goals import Suite, SuiteOptions, log
from lora_export.bench.suite import run_suite
from lora_export.bench.suite_report import write_suite

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> tuple[SuiteOptions, str | None, str | None]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="Tiny sample, few iterations: a seconds-long smoke run.")
    p.add_argument("--model", default=None, help="Model (default sample:gpt2-small; --quick: sample:gpt2).")
    p.add_argument("--out", default=None, help="Markdown output (default BENCHMARKS.md; --quick: none).")
    p.add_argument("--json", dest="json_path", default=None, help="Also write the results as JSON.")
    p.add_argument("--iters", type=int, default=None, help="Timed rounds at batch 1.")
    p.add_argument("--bank-iters", type=int, default=None, help="Timed rounds at the bank batch.")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="Intra-op threads (default: the libraries' own).")
    p.add_argument("--workdir", default=None, help="Keep exported graphs here (default: a temp dir).")
    p.add_argument(
        "--sections", choices=["all", "core", "speed"], default="all", help="core: issues 2-4; speed: issue 11."
    )
    p.add_argument("--speed-iters", type=int, default=None, help="speed: interleaved prefill rounds.")
    p.add_argument("--speed-reps", type=int, default=None, help="speed: greedy generations timed per decoder.")
    p.add_argument("--speed-new-tokens", type=int, default=None, help="speed: tokens per generation (default 128).")
    p.add_argument(
        "--generation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Decoder generation rows (default: on, off with --quick).",
    )
    p.add_argument("--only", choices=["generation"], default=None, help="Run only this group.")
    p.add_argument("--gen-rounds", type=int, default=None, help="Interleaved rounds of whole generations.")
    args = p.parse_args(argv)
    out = args.out if args.out is not None or args.quick else str(ROOT / "BENCHMARKS.md")
    options = SuiteOptions.make(
        args.quick,
        model=args.model,
        iters=args.iters,
        bank_iters=args.bank_iters,
        warmup=args.warmup,
        threads=args.threads,
        workdir=args.workdir,
        sections=args.sections,
        only=args.only,
        speed_iters=args.speed_iters,
        speed_reps=args.speed_reps,
        speed_new_tokens=args.speed_new_tokens,
        generation=args.generation,
        gen_rounds=args.gen_rounds,
    )
    return options, out, args.json_path


def main(argv: list[str] | None = None) -> Suite:
    options, out, json_path = parse_args(argv)
    command = "python tools/benchmarks.py" + ("" if not argv else " " + shlex.join(argv))
    if argv is None and len(sys.argv) > 1:
        command += " " + shlex.join(sys.argv[1:])
    t0 = time.perf_counter()
    suite = run_suite(options)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    md = write_suite(suite, command, out=out, json_path=json_path)
    if not out:
        print(md)
    return suite


if __name__ == "__main__":
    main()

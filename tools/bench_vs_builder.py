"""Ours vs the ONNX Runtime GenAI model builder, same model, every folder run by ONNX Runtime GenAI; the body is
`lora_export.bench.vs_builder` (see its docstring for the candidates and the method).

    python tools/bench_vs_builder.py                 # SmolLM2-135M (30 layers, real weights), r=16 all-linear
    python tools/bench_vs_builder.py --quick         # its 4-layer cut, few tokens: checks it runs
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from lora_export.artifacts.fileio import write_json
from lora_export.bench.vs_builder import VsBuilder, report_lines, run_vs_builder


def main(argv: list[str] | None = None) -> VsBuilder:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="The 4-layer cut, few tokens: checks it runs.")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--workdir", default=None, help="Keep the folders here.")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    bench = run_vs_builder(quick=args.quick, rounds=args.rounds, rank=args.rank, workdir=args.workdir)
    print("\n".join(report_lines(bench)))
    if args.json_path:
        write_json(args.json_path, asdict(bench))
    return bench


if __name__ == "__main__":
    main()

"""Export time: `export-decoder` (traced and `--fused`, merged and inputs) vs the ONNX Runtime GenAI builder, on
the real pretrained SmolLM2 cut to several depths; the body is `lora_export.bench.export_time`.

    python tools/bench_export_time.py                       # 8, 16 and 30 layers
    python tools/bench_export_time.py --layers 4            # checks it runs
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from lora_export.artifacts.fileio import write_json
from lora_export.bench.export_time import ExportTimes, report_lines, run_export_times


def main(argv: list[str] | None = None) -> ExportTimes:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="8,16,30", help="Comma-separated depths (30 = the whole model).")
    p.add_argument("--no-traced", action="store_true", help="Only the builder and the fused exports.")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    bench = run_export_times(layers, traced=not args.no_traced, workdir=args.workdir)
    print("\n".join(report_lines(bench)))
    if args.json_path:
        write_json(args.json_path, asdict(bench))
    return bench


if __name__ == "__main__":
    main()

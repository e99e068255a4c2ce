"""Measure the honest fp32 parity error of our exports, and what a one-weight corruption looks like.

For every model (the sample zoo, a tied-embedding Llama, a `py:` factory; `--large` adds GPT-2 small) and
every export kind (base, merged, branched inputs, bank), ONNX Runtime CPU is compared with the PyTorch
reference on the verify harness's seeds and shapes. Per output it records the max abs error, the output's
scale (max |reference|) and the error relative to that scale (`max_abs / max|ref|`). Then, for each merged
graph, one element of the first adapted weight is changed by +1e-2 and the same numbers are taken: that
is the corruption `verify` must catch.

    python tools/measure_verify_noise.py [--large] [--json out.json]

The fp32 tolerance in `lora_export.verify.tolerance` (used by `verify` and the decoder check) comes from this
distribution (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from lora_export.bench.verify_noise import measure, summarize

warnings.simplefilter("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also GPT-2 small (real shape, random weights)")
    ap.add_argument("--only", default=None, help="comma-separated model names (default: all)")
    ap.add_argument("--json", default=None, help="write every measurement to this file")
    args = ap.parse_args()
    results = measure(args.large, args.only.split(",") if args.only else None)
    summary = summarize(results)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

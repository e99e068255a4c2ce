"""Peak memory and wall time of the exports at realistic sizes (random weights, saved as a local directory first).

    python tools/bench_scale.py                                   # gpt2-small, gpt2-medium, gpt2-large, llama-1b
    python tools/bench_scale.py --shapes gpt2-small --json r.json --markdown r.md
    python tools/bench_scale.py --baseline /path/to/older/checkout --baseline-shapes gpt2-small

What it measures, and how: `lora_export.bench.scale` (this is its command line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_export.bench.scale import MODES, SHAPES, ScaleBenchOptions, run_scale_bench, write_checkpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--workdir", default=None, help="where checkpoints and graphs go (default: a temp dir)")
    ap.add_argument("--baseline", default=None, help="another checkout of lora-export to run the same commands with")
    ap.add_argument("--baseline-shapes", default="gpt2-small")
    ap.add_argument("--headroom", type=float, default=1.0, help="GB to leave free for others")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--write-checkpoint", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_checkpoint:
        print(json.dumps(write_checkpoint(args.write_checkpoint[0], Path(args.write_checkpoint[1]))))
        return 0
    del args.write_checkpoint
    return run_scale_bench(ScaleBenchOptions(**vars(args)))


if __name__ == "__main__":
    sys.exit(main())

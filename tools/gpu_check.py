"""End-to-end GPU check: build, verify, refit X -> Y -> X, and time PyTorch eager vs ORT vs TensorRT.

The check is `lora_export.bench.gpu_check` (what it checks is described there); this is its command line.
Run by `tools/gpu_check.sh` (which sets up the environment); or directly:

    python tools/gpu_check.py                         # sample:gpt2 and sample:gpt2-medium, fp16
    python tools/gpu_check.py --samples gpt2 --iters 20
    python tools/gpu_check.py --cpu-smoke             # the orchestration on CPU (tiny model, fp32)

Exit code: 0 every check passed, 1 a check failed, 3 no CUDA device (without --cpu-smoke).
"""

from __future__ import annotations

import argparse
import sys

from lora_export.bench.gpu_check import SAMPLES, GpuCheckOptions, run_gpu_check


def parse_args(argv: list[str] | None = None) -> GpuCheckOptions:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default=",".join(SAMPLES), help="comma list of sample models")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="graph/engine precision on GPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--workdir", default=None, help="where graphs and plans go (default: a temp dir)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON")
    p.add_argument("--cpu-smoke", action="store_true", help="run the orchestration on CPU (tiny model, fp32)")
    args = p.parse_args(argv)
    args.samples = [s for s in args.samples.split(",") if s]
    return GpuCheckOptions(**vars(args))


def main(argv: list[str] | None = None) -> int:
    return run_gpu_check(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

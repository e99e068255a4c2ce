"""Why the bank layout is dense: time per-row LoRA formulations for one GPT-2-small `c_attn` on ONNX Runtime.

Formulations (x: [B, T, in], W: [in, out], N adapters of rank R, `idx`: [B]):
  base     x·W
  single   x·W + (x·A)·B                          one adapter for the whole batch (the `inputs` layout)
  dense    x·W + ((x·A_cat) ⊙ mask[idx])·B_cat    A_cat [in, N·R], B_cat [N·R, out] (our `bank` layout)
  gather   x·W + bmm(bmm(x, A[idx]), B[idx])      per-row gather + batched matmul

    python tools/bench_bank_formulations.py [--batch 8] [--seq 128] [--adapters 4] [--rank 8] [--iters 50]

Prints medians and ratios to `single`, measured interleaved in one process. The benchmark is
`lora_export.bench.bank_formulations`; this is its command line.
"""

from __future__ import annotations

import argparse

from lora_export.bench.bank_formulations import FormulationOptions, measure_formulations, report_lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-out", type=int, default=2304)
    args = FormulationOptions(**vars(p.parse_args()))
    print("\n".join(report_lines(measure_formulations(args), args)))


if __name__ == "__main__":
    main()

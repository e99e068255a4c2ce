"""The fp32 tolerance of a float output, from float rounding relative to the output's scale.

fp32 rounding error grows with the size of the values: an honest export differs from the PyTorch reference
by a few ulps of its largest values, times the depth of the computation. One function gives the atol that
both `verify` (graph parity) and the decoder check (greedy generation) use:

    atol = max(floor, FP32_SCALE_TOL · max|ref|, NOISE_SAFETY · measured_noise)

- `FP32_SCALE_TOL · max|ref|` (5e-6 ≈ 42 eps32 per unit of scale) is the model-free part. Measured with
  tools/measure_verify_noise.py (ONNX Runtime CPU vs PyTorch; the sample zoo, a tied Llama, a py: factory and
  GPT-2 small; base/merged/branched; seeds 0-2 x 4 shapes): honest exports reach 9.5e-7 x scale on the tiny
  models (p50 2.5e-7) and 1.5e-6 x on GPT-2 small (12 layers); one weight element changed by 1e-2 moves an
  output by 1.3e-5 x (bert, a query weight) up to 5e-4 x (llama, q_proj) its scale.
- `measured_noise` is the reference's own fp32 noise on the same inputs, taken by running it again under a
  different evaluation order (the decoder check: transformers `generate` with its KV cache against one
  full-sequence forward of the same tokens). A deep trained model (30 layers, logits at ±20-30) has noise
  above the model-free part (issue 25: 1.7e-4 against a fixed 1e-4, every token equal); the safety factor
  covers a candidate whose own rounding is independent of the reference's (up to twice the noise) and the
  spread between inputs.
- `floor` keeps the atol off zero for outputs that are all zeros.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
FP32_SCALE_TOL = 5e-6  # x max|ref|: the model-free part (see above)
NOISE_SAFETY = 8.0  # x the reference's measured fp32 reordering noise
FP32_FLOOR = 1e-6


@dataclass(frozen=True)
class Tolerance:
    """An atol and how it was reached (printed in reports)."""

    atol: float
    scale: float  # max |reference| over finite values
    noise: float | None = None  # the reference's measured fp32 reordering noise, when measured
    basis: str = "scale"  # "scale" (FP32_SCALE_TOL x scale), "noise" (NOISE_SAFETY x noise) or "floor"

    def describe(self) -> str:
        text = f"atol {self.atol:.2g} ({self.basis}: max|ref| {self.scale:.3g}"
        return text + (f", fp32 noise {self.noise:.2g})" if self.noise is not None else ")")

    def to_dict(self) -> dict:
        return asdict(self)


def scale_of(ref) -> float:
    """max |ref| over its finite values (0 for an empty array)."""
    a = np.abs(np.asarray(ref, np.float64))
    return float(a[np.isfinite(a)].max(initial=0.0)) if a.size else 0.0


def fp32_tolerance(ref, *, noise: float | None = None, floor: float = FP32_FLOOR) -> Tolerance:
    """The fp32 atol of an output whose reference values are `ref`; `noise`: the reference's own measured fp32
    noise on the same inputs (max abs difference under a reordering), when the caller measured it."""
    scale = scale_of(ref)
    parts = {"floor": floor, "scale": float(f"{FP32_SCALE_TOL * scale:.2g}")}
    if noise is not None and np.isfinite(noise):
        parts["noise"] = float(f"{NOISE_SAFETY * noise:.2g}")
    basis = max(parts, key=parts.get)
    return Tolerance(parts[basis], scale, noise, basis)

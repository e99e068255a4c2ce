"""Pure comparison functions: numpy in, JSON-serializable dataclasses out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lora_export.verify.tolerance import fp32_tolerance

# (atol, rtol) by graph dtype (`contract.precision`); bf16 keeps 8 mantissa bits to fp16's 11
DEFAULT_TOLERANCES = {"fp32": (1e-6, 0.0), "fp16": (3e-2, 3e-2), "bf16": (1e-1, 1e-1)}


def default_atol(dtype: str, ref: np.ndarray) -> float:
    """The dtype's default atol for an output whose reference values are `ref` (fp32: scaled with the output,
    `verify.tolerance.fp32_tolerance`)."""
    atol = DEFAULT_TOLERANCES[dtype][0]
    if dtype == "fp32" and np.size(ref):
        atol = fp32_tolerance(ref, floor=atol).atol
    return atol


# A quantized base cannot meet an elementwise tolerance: it passes on agreement instead, per output
# (cosine similarity with the reference, and for logits the share of positions with the same top-1 token).
QUANTIZED_CRITERIA = {
    "int8": {"cosine": 0.99, "top1": 0.9},
    "int8-block": {"cosine": 0.995, "top1": 0.95},
    "int4": {"cosine": 0.98, "top1": 0.5},
}


@dataclass
class OutputStats:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    atol: float
    rtol: float
    passed: bool
    top1_agreement: float | None = None
    reason: str = ""
    criteria: dict | None = None  # agreement criteria used instead of atol/rtol (quantized graphs)


@dataclass
class CaseReport:
    """One input set: its shape label and each output's statistics."""

    label: str
    outputs: list[OutputStats]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


@dataclass
class ParityReport:
    reference: str
    candidate: str
    cases: list[CaseReport] = field(default_factory=list)
    checks: dict[str, dict] = field(default_factory=dict)  # named extra checks (adapter effect, ...)
    artifacts: list[str] = field(default_factory=list)  # files kept for reproduction (--save-inputs)
    method: str = ""  # how the backends ran: the whole model, one at a time, or by layer (`verify.by_layer`)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases) and all(c.get("passed", True) for c in self.checks.values())

    def worst(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.cases:
            for o in c.outputs:
                out[o.name] = max(out.get(o.name, 0.0), o.max_abs)
        return out

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "passed": self.passed,
            "cases": [
                {"label": c.label, "passed": c.passed, "outputs": [asdict(o) for o in c.outputs]} for c in self.cases
            ],
            "checks": self.checks,
            "summary": self.summary(),
            "artifacts": list(self.artifacts),
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ParityReport:
        cases = [CaseReport(c["label"], [OutputStats(**o) for o in c["outputs"]]) for c in d.get("cases", [])]
        return cls(
            d["reference"],
            d["candidate"],
            cases,
            dict(d.get("checks", {})),
            list(d.get("artifacts", [])),
            d.get("method", ""),
        )

    def summary(self) -> dict[str, dict]:
        """Per output, over every case: worst max abs / max rel / mean abs, lowest cosine and top-1, pass count."""
        out: dict[str, dict] = {}
        for c in self.cases:
            for o in c.outputs:
                s = out.setdefault(
                    o.name,
                    {
                        "max_abs": 0.0,
                        "max_rel": 0.0,
                        "mean_abs": 0.0,
                        "cosine": 1.0,
                        "top1": None,
                        "passed": 0,
                        "cases": 0,
                    },
                )
                s["max_abs"] = max(s["max_abs"], o.max_abs)
                s["max_rel"] = max(s["max_rel"], o.max_rel)
                s["mean_abs"] = max(s["mean_abs"], o.mean_abs)
                s["cosine"] = min(s["cosine"], o.cosine)
                if o.top1_agreement is not None:
                    s["top1"] = o.top1_agreement if s["top1"] is None else min(s["top1"], o.top1_agreement)
                s["passed"] += int(o.passed)
                s["cases"] += 1
        return out


def _failed(name: str, shape: list[int], atol: float, rtol: float, reason: str) -> OutputStats:
    inf = float("inf")
    return OutputStats(name, shape, inf, inf, inf, 0.0, atol, rtol, False, reason=reason)


def compare_output(
    name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float, criteria: dict | None = None
) -> OutputStats:
    """Elementwise `atol + rtol·|ref|`; with `criteria` ({"cosine": c, "top1": t}) the output passes on
    cosine >= c and, for logits, top-1 agreement >= t instead."""
    ref64, got64 = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref64.shape != got64.shape:
        return _failed(
            name, list(got64.shape), atol, rtol, f"shape {list(got64.shape)} != reference {list(ref64.shape)}"
        )
    if not np.isfinite(got64).all() and np.isfinite(ref64).all():
        return _failed(name, list(ref64.shape), atol, rtol, "non-finite values in the candidate")
    diff = np.abs(got64 - ref64)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(ref64), 1e-6)).max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    denom = float(np.linalg.norm(ref64) * np.linalg.norm(got64))
    cosine = float((ref64.ravel() @ got64.ravel()) / denom) if denom > 0 else 1.0
    passed = bool(np.all(diff <= atol + rtol * np.abs(ref64)))
    top1 = None
    if name == "logits" and ref64.ndim >= 2:
        top1 = float(np.mean(ref64.argmax(-1) == got64.argmax(-1)))
    tol = f"atol {atol:g}" + (f" + rtol {rtol:g}·|ref|" if rtol else "")
    reason = "" if passed else f"max abs error {max_abs:.3g} above {tol}"
    if criteria:
        low = [f"cosine {cosine:.5f} < {criteria['cosine']}"] if cosine < criteria.get("cosine", -1.0) else []
        if top1 is not None and top1 < criteria.get("top1", 0.0):
            low.append(f"top-1 agreement {top1:.3f} < {criteria['top1']}")
        passed, reason = not low, "; ".join(low)
    return OutputStats(
        name, list(ref64.shape), max_abs, max_rel, mean_abs, cosine, atol, rtol, passed, top1, reason, criteria
    )


def compare_outputs(
    ref: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    *,
    dtype: str = "fp32",
    atol: dict[str, float] | None = None,
    rtol: dict[str, float] | None = None,
    label: str = "",
    criteria: dict | None = None,
) -> CaseReport:
    """Compare every reference output; per-output tolerances override the dtype defaults (`default_atol`).
    `criteria`
    (see `compare_output`) replaces the elementwise tolerances, for quantized graphs."""
    _, d_rtol = DEFAULT_TOLERANCES[dtype]
    atol, rtol = atol or {}, rtol or {}
    stats = []
    for name, r in ref.items():
        d_atol = default_atol(dtype, r)
        if name not in got:
            stats.append(_failed(name, list(np.shape(r)), d_atol, d_rtol, "missing from the candidate's outputs"))
            continue
        stats.append(
            compare_output(
                name,
                r,
                got[name],
                atol.get(name, atol.get("*", d_atol)),
                rtol.get(name, rtol.get("*", d_rtol)),
                criteria,
            )
        )
    return CaseReport(label, stats)


def adapter_effect(
    with_adapter: dict[str, np.ndarray], base: dict[str, np.ndarray], parity_error: float, factor: float = 10.0
) -> dict:
    """The adapter must move the outputs well above the parity error, or it was silently dropped."""
    effect = max(
        float(np.abs(np.asarray(with_adapter[k], np.float64) - np.asarray(base[k], np.float64)).max())
        for k in with_adapter
    )
    passed = effect > factor * max(parity_error, 1e-7)
    return {
        "effect_max_abs": effect,
        "parity_max_abs": parity_error,
        "factor": factor,
        "passed": passed,
        "reason": "" if passed else _effect_reason(effect, parity_error, factor),
    }


def _effect_reason(effect: float, parity_error: float, factor: float) -> str:
    if effect <= 1e-6:
        return "the adapter does not change the reference outputs at all (is B zero?): a dropped adapter would pass"
    return (
        f"the adapter's effect ({effect:.3g}) is not {factor:g}x the parity error ({parity_error:.3g}): "
        "the candidate may have dropped the adapter, or it is too small to tell apart"
    )

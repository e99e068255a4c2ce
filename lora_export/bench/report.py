"""Benchmark reports: a JSON-serializable schema, the machine description, markdown and rich tables.

Pure data in, text or dicts out; `lora_export.cli.bench` and `tools/benchmarks.py` only print them.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from lora_export.bench.latency import LatencyStats

SCHEMA = "lora-export/bench/1"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_machine(load_at_start: tuple[float, float, float]) -> dict[str, Any]:
    """`machine_info()` with the load average at a run's start and now, at its end (the machines are shared)."""
    return {**machine_info(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}


def publish(results: dict[str, Any], json_path, markdown_path, render) -> None:
    """Print `results` (less its per-run rows), and write them as JSON and `render(results)` as markdown where
    those paths are given."""
    import json

    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
    if markdown_path:
        markdown_path.write_text(render(results))


def machine_info() -> dict[str, Any]:
    """CPU model, cores, OS, library versions, and the GPU if PyTorch sees one."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["cores_available"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        pass
    for name, dist in (
        ("torch", "torch"),
        ("onnxruntime", "onnxruntime"),
        ("onnxruntime-gpu", "onnxruntime-gpu"),
        ("onnx", "onnx"),
        ("tensorrt", "tensorrt"),
        ("numpy", "numpy"),
        ("lora-export", "lora-export"),
    ):
        v = _version(dist)
        if v is not None or name in ("torch", "onnxruntime", "tensorrt"):
            info[name] = v or "not installed"
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception:  # pragma: no cover
        pass
    try:
        import onnxruntime as ort

        info["ort_providers"] = ort.get_available_providers()
    except Exception:  # pragma: no cover
        pass
    return info


def machine_line(m: dict[str, Any]) -> str:
    parts = [f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"]
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']} (CUDA {m.get('cuda')})")
    parts += [f"torch {m.get('torch')}", f"onnxruntime {m.get('onnxruntime')}", f"tensorrt {m.get('tensorrt')}"]
    parts.append(f"Python {m.get('python')}, {m.get('platform')}")
    return "; ".join(parts)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class BenchRow:
    """One (backend, mode, shape) measurement and its ratios to the references."""

    backend: str
    mode: str
    batch: int
    seq: int
    stats: LatencyStats
    vs_reference: float | None = None  # p50 / p50 of the reference (default: same backend, base mode)
    reference: str | None = None
    vs_torch: float | None = None  # p50 / p50 of PyTorch eager, same mode (base if that mode has no torch row)
    torch_reference: str | None = None

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.mode}/b{self.batch}s{self.seq}"

    @property
    def speedup_vs_torch(self) -> float | None:
        return 1.0 / self.vs_torch if self.vs_torch else None

    def to_dict(self, samples: bool = True) -> dict:
        return {
            "backend": self.backend,
            "mode": self.mode,
            "batch": self.batch,
            "seq": self.seq,
            "stats": self.stats.to_dict(samples),
            "vs_reference": self.vs_reference,
            "reference": self.reference,
            "vs_torch": self.vs_torch,
            "torch_reference": self.torch_reference,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BenchRow:
        return cls(
            d["backend"],
            d["mode"],
            int(d["batch"]),
            int(d["seq"]),
            LatencyStats.from_dict(d["stats"]),
            d.get("vs_reference"),
            d.get("reference"),
            d.get("vs_torch"),
            d.get("torch_reference"),
        )


@dataclass
class BenchReport:
    model: str
    adapters: list[str]
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # skipped backends/modes, random adapters, ...
    date: str = field(default_factory=now_utc)
    command: str = ""

    def to_dict(self, samples: bool = True) -> dict:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "adapters": list(self.adapters),
            "date": self.date,
            "command": self.command,
            "machine": self.machine,
            "settings": self.settings,
            "rows": [r.to_dict(samples) for r in self.rows],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> BenchReport:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} report (schema={d.get('schema')!r})")
        return cls(
            model=d["model"],
            adapters=list(d["adapters"]),
            machine=dict(d["machine"]),
            settings=dict(d["settings"]),
            rows=[BenchRow.from_dict(r) for r in d["rows"]],
            notes=list(d.get("notes", [])),
            date=d.get("date", ""),
            command=d.get("command", ""),
        )

    def find(self, backend: str, mode: str, batch: int, seq: int) -> BenchRow | None:
        for r in self.rows:
            if (r.backend, r.mode, r.batch, r.seq) == (backend, mode, batch, seq):
                return r
        return None


def fill_ratios(rows: list[BenchRow], reference: str = "base") -> None:
    """Set each row's ratio to its reference: `MODE` (same backend) or `BACKEND:MODE`, same shape; and to torch."""
    index = {(r.backend, r.mode, r.batch, r.seq): r for r in rows}
    ref_backend, _, ref_mode = reference.rpartition(":")
    for r in rows:
        backend = ref_backend or r.backend
        ref = index.get((backend, ref_mode, r.batch, r.seq))
        if ref is not None:
            r.reference = f"{backend}/{ref_mode}"
            r.vs_reference = r.stats.p50 / ref.stats.p50 if ref.stats.p50 > 0 else None
        t = index.get(("torch", r.mode, r.batch, r.seq)) or index.get(("torch", "base", r.batch, r.seq))
        if t is not None and r.backend != "torch":
            r.torch_reference = f"torch/{t.mode}"
            r.vs_torch = r.stats.p50 / t.stats.p50 if t.stats.p50 > 0 else None


TABLE_COLUMNS = [
    "backend",
    "mode",
    "batch",
    "seq",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "tokens/s",
    "vs ref",
    "vs torch",
]


def table_rows(report: BenchReport) -> list[list]:
    out = []
    for r in report.rows:
        s = r.stats
        out.append(
            [
                r.backend,
                r.mode,
                r.batch,
                r.seq,
                round(s.p50, 3),
                round(s.p90, 3),
                round(s.p99, 3),
                round(s.tokens_per_s) if s.tokens_per_s else None,
                f"{r.vs_reference:.3f}× {r.reference}" if r.vs_reference is not None else None,
                f"{r.vs_torch:.3f}× ({1 / r.vs_torch:.2f}× faster)" if r.vs_torch else None,
            ]
        )
    return out


def to_markdown(report: BenchReport) -> str:
    """The report as a markdown section: settings, a table, notes, machine."""
    st = report.settings
    lines = [
        f"## lora-export bench: {report.model}",
        "",
        f"{report.date}. Adapters: {', '.join(report.adapters) or 'none'}. "
        f"Warm-up {st.get('warmup')}, {st.get('iters')} iterations interleaved across candidates "
        f"({st.get('order', 'shuffle')} order), {st.get('input_sets', 1)} rotating input sets, "
        f"threads {st.get('threads')}. Ratios are of median (p50) latencies.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    for row in table_rows(report):
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    if report.notes:
        lines += ["", *[f"- {n}" for n in report.notes]]
    lines += ["", f"Machine: {machine_line(report.machine)}"]
    if report.command:
        lines += ["", f"Command: `{report.command}`"]
    return "\n".join(lines) + "\n"

"""Export time: `export-decoder` (traced and `--fused`; merged, inputs and a 2-adapter bank) vs the ONNX Runtime
GenAI builder.

    python tools/bench_export_time.py                       # SmolLM2-135M cut to 8 and 16 layers, and whole (30)
    python tools/bench_export_time.py --layers 4            # checks it runs

Every build is a fresh subprocess (the CLI as a user runs it, with `--no-verify`: the build alone, as the
builder's), timed for wall and CPU seconds (the child's user + system time), one after another in one run,
on the real pretrained weights with an all-linear r=8 PEFT adapter (B non-zero; the bank holds it and a second
one). Ratios are ours / the builder's fp32 build of the same model.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_export.bench.goals import log
from lora_export.bench.vs_builder import random_adapter_dir

# the goals: ours / builder build time, 30 layers
GOALS = {"merged": 2.0, "inputs": 3.0, "bank": 3.0}  # bank: the branch-carrying layouts' goal


@dataclass
class ExportTimes:
    rows: list[dict] = field(default_factory=list)  # layers, what, wall_s, cpu_s, ratio_wall


def _timed(cmd: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed: {tail[0]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_export_times(layers: list[int], *, traced: bool = True, workdir: str | None = None) -> ExportTimes:
    from lora_export.models.pretrained import model_dir

    bench = ExportTimes()
    cli = [sys.executable, "-m", "lora_export"]
    with tempfile.TemporaryDirectory(prefix="bench_export_time_") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        for n in layers:
            source = model_dir("smollm2", layers=None if n >= 30 else n)
            adapter = random_adapter_dir(source, work / f"adapter_{n}", 8)
            second = random_adapter_dir(source, work / f"second_{n}", 8, seed=1)
            base = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-e", "cpu"]
            runs = {"builder fp32": [*base, "-o", str(work / f"b{n}"), "-p", "fp32", "-c", str(work / "cache")]}
            for layout in ("merged", "inputs", "bank"):
                common = [*cli, "export-decoder", str(source), "--adapter", str(adapter), "--layout", layout]
                common += ["--adapter", str(second)] if layout == "bank" else []
                common += ["--no-verify", "--force"]
                runs[f"fused {layout}"] = [*common, "--fused", "-o", str(work / f"f{n}{layout}")]
                if traced:
                    runs[f"traced {layout}"] = [*common, "--unfused", "-o", str(work / f"t{n}{layout}")]
            builder_wall = None
            for what, cmd in runs.items():
                log(f"{n} layers: {what}")
                wall, cpu = _timed(cmd)
                builder_wall = wall if what == "builder fp32" else builder_wall
                bench.rows.append(
                    {"layers": n, "what": what, "wall_s": wall, "cpu_s": cpu, "ratio_wall": wall / builder_wall}
                )
    return bench


def report_lines(bench: ExportTimes) -> list[str]:
    lines = [f"{'layers':>6} {'what':<16} {'wall s':>8} {'cpu s':>8} {'/ builder':>10} goal"]
    for r in bench.rows:
        layout = r["what"].split()[-1]
        goal = GOALS.get(layout) if r["what"] != "builder fp32" else None
        verdict = "" if goal is None else f"<= {goal:.1f}" + (" ok" if r["ratio_wall"] <= goal else " NOT MET")
        times = f"{r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {r['ratio_wall']:>10.2f}"
        lines.append(f"{r['layers']:>6} {r['what']:<16} {times} {verdict}")
    return lines

"""tools/benchmarks.py --quick (lora_export.bench.suite): the reference suite runs end to end on the tiny sample
and reports every goal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lora_export.bench.goals import Goal

ROOT = Path(__file__).resolve().parents[1]


def test_quick_suite_measures_every_goal(tmp_path):
    md, js = tmp_path / "B.md", tmp_path / "b.json"
    args = ["--quick", "--out", str(md), "--json", str(js), "--workdir", str(tmp_path / "w")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmarks.py"), *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(js.read_text())
    goals = data["goals"]
    metrics = {g["metric"].split(" (")[0] for g in goals}
    for expected in (
        "merged / base graph latency",
        "ORT speedup over PyTorch eager, base graph",
        "merge-and-export wall time",
        "branched + adapter / merged",
        "bank, 4 adapters / branched, 1 adapter",
        "adapter switch in LoraSession, median, forward excluded",
        "pack-adapter",
        "naive route per adapter: re-export + new session",
        "optimized / plain branched graph",
        "fused fp32 / plain fp32, decode ms/token",
        "int8 base / fp32, prefill 1x128",
        "int4 base / fp32, decode ms/token",
        "branched+adapter on int8 / merged int8, decode ms/token",
        "greedy-token agreement int8 vs fp32 over 6 tokens",
    ):
        assert expected in metrics, (expected, metrics)
    measured = {g["metric"].split(" (")[0]: g for g in goals}
    for key in ("merged / base graph latency", "branched + adapter / merged", "bank, 4 adapters / branched, 1 adapter"):
        assert measured[key]["measured"] > 0 and measured[key]["status"] in ("met", "NOT met")
    text = md.read_text()
    assert text.startswith("# Benchmarks") and "| issue | metric | goal | measured | status |" in text
    assert "python tools/benchmarks.py --quick" in text and "Machine:" in text and "QUICK mode" in text
    assert (
        data["quick"]
        and data["command"].startswith("python tools/benchmarks.py --quick")
        and data["machine"]["cores"] >= 1
    )
    groups = {r["group"] for r in data["latency"]}
    assert "batch 1, seq 16" in groups and "batch 8, seq 16" in groups


def test_goal_status():
    assert Goal("r", 2, "<= 1.02", 1.01, "x", 1.02).status == "met"
    assert Goal("r", 2, "<= 1.02", 1.05, "x", 1.02).status == "NOT met"
    assert Goal("s", 4, ">= 3x", 3.5, "x", 3.0, lower_is_better=False).status == "met"
    assert Goal("t", 2, "reported", 12.0, "s").status == "reported"
    assert Goal("o", 4, ">= 3x", None).status == "skipped"

"""tools/benchmarks.py --quick: the reference suite runs end to end on the tiny sample and reports every goal."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("lora_benchmarks", ROOT / "tools" / "benchmarks.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_suite_measures_every_goal(tmp_path):
    tool = _load_tool()
    md, js = tmp_path / "B.md", tmp_path / "b.json"
    suite = tool.main(["--quick", "--out", str(md), "--json", str(js), "--workdir", str(tmp_path / "w")])
    metrics = {g.metric.split(" (")[0] for g in suite.goals}
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
    measured = {g.metric.split(" (")[0]: g for g in suite.goals}
    for key in ("merged / base graph latency", "branched + adapter / merged", "bank, 4 adapters / branched, 1 adapter"):
        assert measured[key].measured > 0 and measured[key].status in ("met", "NOT met")
    text = md.read_text()
    assert text.startswith("# Benchmarks") and "| issue | metric | goal | measured | status |" in text
    assert "python tools/benchmarks.py --quick" in text and "Machine:" in text and "QUICK mode" in text
    data = json.loads(js.read_text())
    assert data["quick"] and len(data["goals"]) == len(suite.goals) and data["machine"]["cores"] >= 1
    groups = {r["group"] for r in data["latency"]}
    assert "batch 1, seq 16" in groups and "batch 8, seq 16" in groups


def test_goal_status():
    tool = _load_tool()
    assert tool.Goal("r", 2, "<= 1.02", 1.01, "x", 1.02).status == "met"
    assert tool.Goal("r", 2, "<= 1.02", 1.05, "x", 1.02).status == "NOT met"
    assert tool.Goal("s", 4, ">= 3x", 3.5, "x", 3.0, lower_is_better=False).status == "met"
    assert tool.Goal("t", 2, "reported", 12.0, "s").status == "reported"
    assert tool.Goal("o", 4, ">= 3x", None).status == "skipped"

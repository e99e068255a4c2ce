"""tools/gpu_check.sh and its Python part (lora_export.bench.gpu_check): syntax, and the orchestration run on
CPU (TensorRT skipped)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_export.bench import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def test_shell_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")
    subprocess.run([bash, "-n", str(TOOLS / "gpu_check.sh")], check=True)


def test_no_cuda_exits_3_with_one_line():
    if gc.capabilities()["cuda"] is None:
        pytest.skip("this machine has CUDA")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "gpu_check.py"), "--samples", "gpt2"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: no CUDA device")


def test_cpu_smoke_runs_checks_and_lists_skips(tmp_path, capsys):
    caps = gc.capabilities()
    if caps["cuda"] is None:
        pytest.skip("CUDA present: run tools/gpu_check.sh for the real check")
    out_json = tmp_path / "report.json"
    options = gc.GpuCheckOptions(
        cpu_smoke=True, samples=["gpt2"], iters=2, warmup=1, seq=16, workdir=str(tmp_path), json_path=str(out_json)
    )
    code = gc.run_gpu_check(options)
    text = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert code == 0 and report["passed"]
    names = [c["name"] for c in report["checks"]]
    assert any("ort/merged" in n for n in names) and any("ort/branched" in n for n in names)
    if caps["tensorrt"]:
        assert any("TensorRT engines" in s for s in report["skipped"])
    assert "latency sample:gpt2" in text and "checks passed" in text
    assert {r["candidate"] for r in report["latency"]} >= {"ort/merged", "ort/branched"}


def test_format_tables_states_goals_and_failures():
    report = gc.GpuReport()
    report.latency = [
        {"sample": "s", "candidate": "torch-fp16/merged", "batch": 1, "seq": 128, "p50_ms": 2.0, "p90_ms": 2.2},
        {"sample": "s", "candidate": "trt/merged", "batch": 1, "seq": 128, "p50_ms": 1.0, "p90_ms": 1.1},
    ]
    report.timings = [{"sample": "s", "engine": "merged", "build_s": 60.0, "refit_s": [0.2, 0.3]}]
    report.goals = [{"sample": "s", "goal": "g", "value": 2.0, "target": ">= 1.5", "met": True}]
    report.checks = [gc.Check("a", True), gc.Check("b", False, "why")]
    text = gc.format_tables(report)
    assert "0.50" in text and "60.0" in text and "0.200, 0.300" in text
    assert "met" in text and "1/2 checks passed" in text and "FAILED b: why" in text

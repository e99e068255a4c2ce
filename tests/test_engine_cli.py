"""build-engine / refit commands: help without TensorRT, exit code 3 with one line when it is missing."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lora_export.artifacts.plan_manifest import PlanManifest
from lora_export.cli import cli
from lora_export.engines._trt import INSTALL_HINT, cuda_unavailable, tensorrt_unavailable, unavailable_reason

no_trt = pytest.mark.skipif(tensorrt_unavailable() is None, reason="TensorRT is installed here")


def _invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.mark.parametrize("command", ["build-engine", "refit"])
def test_help_works_without_tensorrt(command):
    result = _invoke([command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


@no_trt
def test_build_engine_without_tensorrt_exits_3_with_one_line(tmp_path):
    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"not parsed: TensorRT is checked first")
    result = _invoke(["build-engine", str(graph), "-o", str(tmp_path / "m.plan"), "--refit"])
    assert result.exit_code == 3
    assert result.output.strip() == f"error: {INSTALL_HINT}"
    assert not (tmp_path / "m.plan").exists()


@no_trt
def test_refit_without_tensorrt_exits_3_with_one_line(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\0")
    PlanManifest(tensorrt="10.8.0", source={"kind": "merged"}, refittable=True).write(plan)
    result = _invoke(["refit", str(plan), "--base-model", "--in-place"])
    assert result.exit_code == 3
    assert result.output.strip() == f"error: {INSTALL_HINT}"


def test_refit_argument_errors_exit_2(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\0")
    assert _invoke(["refit", str(plan), "--in-place"]).exit_code == 2  # neither --adapter nor --base-model
    result = _invoke(["refit", str(plan), "--base-model"])  # neither -o nor --in-place
    assert result.exit_code == 2 and "--in-place" in result.output
    result = _invoke(["refit", str(tmp_path / "none.plan"), "--base-model", "--in-place"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_build_engine_missing_graph_exits_2(tmp_path):
    result = _invoke(["build-engine", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "x.plan")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_unavailable_reasons_are_one_line():
    for reason in (tensorrt_unavailable(), cuda_unavailable(), unavailable_reason()):
        assert reason is None or "\n" not in reason

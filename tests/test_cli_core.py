"""The CLI in-process (click.testing.CliRunner): the happy paths and every bad input's exact outcome."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run


def no_files_like(folder: Path, name: str) -> bool:
    return not any(p.name.startswith(name) or p.name.startswith(f".{name}") for p in folder.iterdir())


def test_make_adapter_writes_a_peft_directory(adapter_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["c_attn"] and config["peft_type"] == "LORA"
    assert (adapter_dir / "adapter_model.safetensors").exists()


def test_merge_and_export_then_verify_and_inspect(adapter_dir, tmp_path):
    out = tmp_path / "m.onnx"
    result = run("merge-and-export", "sample:gpt2", "--adapter", adapter_dir, "-o", out)
    assert "verified" in result.output and out.exists() and Path(f"{out}.json").exists()
    report = tmp_path / "r.json"
    result = run(
        "verify",
        "sample:gpt2",
        "--adapter",
        adapter_dir,
        "--onnx",
        out,
        "--json",
        report,
        "--atol",
        "logits:1e-4",
        "--seeds",
        "0,1",
        "--shapes",
        "1x5,4x9",
    )
    data = json.loads(report.read_text())
    assert data["passed"] and len(data["cases"]) == 4
    assert {"max_abs", "max_rel", "mean_abs", "cosine", "top1_agreement"} <= set(data["cases"][0]["outputs"][0])
    result = run("inspect", out, "--json")
    assert json.loads(result.output)["layout"] == "merged"
    result = run("inspect", adapter_dir, "--model", "sample:gpt2", "--json")
    info = json.loads(result.output)
    assert info["modules"] == 2 and 0 < info["trainable_fraction"] < 0.05
    result = run("inspect", "sample:llama")
    assert "q_proj" in result.output


def test_verify_exit_code_1_on_mismatch(adapter_dir, tmp_path):
    base = tmp_path / "base.onnx"
    run("merge-and-export", "sample:gpt2", "-o", base)  # no adapter: the plain base model
    result = run("verify", "sample:gpt2", "--adapter", adapter_dir, "--onnx", base, ok=False)
    assert result.exit_code == 1 and "FAIL" in result.output


def test_export_branched_and_pack_adapter(adapter_dir, tmp_path):
    graph = tmp_path / "b.onnx"
    result = run("export-branched", "sample:gpt2", "--adapter", adapter_dir, "-o", graph)
    assert "2 LoRA slots" in result.output and "verified" in result.output
    packed = tmp_path / "a.onnx_adapter"
    run("pack-adapter", adapter_dir, "-o", packed, "--graph", graph)
    assert packed.exists()
    result = run("inspect", graph, "--json")
    assert json.loads(result.output)["lora_modules"] == 2


# -- bad inputs: one line, exit code != 0, no traceback, nothing left behind ----------------------------------------
def test_adapter_directory_missing(tmp_path):
    result = run("merge-and-export", "sample:gpt2", "--adapter", tmp_path / "nope", "-o", tmp_path / "o.onnx", ok=False)
    assert_one_line_error(result, r"adapter .*nope does not exist")
    assert no_files_like(tmp_path, "o.onnx")


def test_adapter_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run(
        "merge-and-export", "sample:gpt2", "--adapter", tmp_path / "empty", "-o", tmp_path / "o.onnx", ok=False
    )
    assert_one_line_error(result, r"has no adapter_config\.json: expected a PEFT adapter directory")
    assert no_files_like(tmp_path, "o.onnx")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(adapter_dir, tmp_path, damage):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    weights = bad / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    result = run("merge-and-export", "sample:gpt2", "--adapter", bad, "-o", tmp_path / "o.onnx", ok=False)
    assert_one_line_error(result, r"cannot read .*adapter_model\.safetensors: truncated or not a safetensors file")
    assert no_files_like(tmp_path, "o.onnx")


def test_adapter_targets_modules_the_model_lacks(tmp_path):
    llama_adapter = tmp_path / "llama_adapter"
    run("make-adapter", "sample:llama", "-o", llama_adapter)
    result = run("merge-and-export", "sample:gpt2", "--adapter", llama_adapter, "-o", tmp_path / "o.onnx", ok=False)
    assert_one_line_error(
        result,
        r"targets 4 module\(s\) the model lacks: model\.layers\.0\.self_attn\.q_proj "
        r"\(closest: .+\)",
    )
    assert no_files_like(tmp_path, "o.onnx")


def test_adapter_shapes_do_not_fit(adapter_dir, tmp_path):
    import torch

    from lora_export.adapters import read_adapter, write_peft_adapter
    from lora_export.adapters.adapter import ModuleLora

    adapter = read_adapter(adapter_dir)
    path = "transformer.h.0.attn.c_attn"
    adapter.modules[path] = ModuleLora(A=torch.ones(4, 48), B=torch.ones(192, 4), scaling=1.0)  # in should be 64
    write_peft_adapter(adapter, tmp_path / "wrong")
    result = run(
        "merge-and-export", "sample:gpt2", "--adapter", tmp_path / "wrong", "-o", tmp_path / "o.onnx", ok=False
    )
    assert_one_line_error(
        result,
        rf"{path}: adapter shapes lora_A \(4, 48\), lora_B \(192, 4\) do not fit the "
        r"model's weight \(64, 192\)",
    )
    assert no_files_like(tmp_path, "o.onnx")


def test_nonfinite_adapter_refused_unless_allowed(adapter_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(adapter_dir, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    result = run("merge-and-export", "sample:gpt2", "--adapter", bad, "-o", tmp_path / "o.onnx", ok=False)
    assert_one_line_error(result, r"lora_B has 1 NaN/Inf values; fix the adapter or pass --allow-nonfinite")
    assert no_files_like(tmp_path, "o.onnx")
    result = run(
        "merge-and-export",
        "sample:gpt2",
        "--adapter",
        bad,
        "-o",
        tmp_path / "o.onnx",
        "--allow-nonfinite",
        "--no-verify",
    )
    assert (tmp_path / "o.onnx").exists()


def test_unsupported_peft_field_is_named(adapter_dir, tmp_path):
    import shutil

    bad = tmp_path / "dora"
    shutil.copytree(adapter_dir, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(config))
    result = run("merge-and-export", "sample:gpt2", "--adapter", bad, "-o", tmp_path / "o.onnx", ok=False)
    assert_one_line_error(result, r"use_dora is set but .* has no lora_magnitude_vector")


def test_output_exists_refused_unless_force(adapter_dir, tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    result = run("merge-and-export", "sample:gpt2", "--adapter", adapter_dir, "-o", out, ok=False)
    assert_one_line_error(result, r"o\.onnx already exists: pass --force to overwrite it")
    assert out.read_bytes() == b"keep me"
    run("merge-and-export", "sample:gpt2", "--adapter", adapter_dir, "-o", out, "--force", "--no-verify")
    assert out.stat().st_size > 1000


def test_interrupted_export_leaves_no_file(adapter_dir, tmp_path, monkeypatch):
    import onnx_ir

    real_save = onnx_ir.save

    def save_then_interrupt(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)  # a complete temp file exists, then Ctrl-C arrives
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_ir, "save", save_then_interrupt)
    result = run("merge-and-export", "sample:gpt2", "--adapter", adapter_dir, "-o", tmp_path / "o.onnx", ok=False)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_tolerance_syntax(adapter_dir, tmp_path):
    result = run("verify", "sample:gpt2", "--onnx", tmp_path / "x.onnx", "--atol", "logits:abc", ok=False)
    assert_one_line_error(result, r"--atol 'logits:abc': expected NAME:NUMBER")


def test_demo_runs_twice_and_owns_its_folder(tmp_path):
    first = run("demo", "-o", tmp_path / "demo", "--items", "8")
    assert "description" in first.output and "review" in first.output and "(no adapter)" in first.output
    assert "identical" in first.output and "BLEU" in first.output
    assert "not the export's" in " ".join(first.output.split())  # a tiny model's wrong facts are explained
    assert (tmp_path / "demo" / "e2e_bank" / "model.onnx").exists()
    again = run("demo", "-o", tmp_path / "demo", "--items", "8")  # the demo's own folder: replaced
    assert again.output.split("input")[1] == first.output.split("input")[1]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert_one_line_error(run("demo", "-o", mine, ok=False), "not written by the demo")
    assert (mine / "notes.txt").read_text() == "keep"


def test_python_dash_m_and_help():
    proc = subprocess.run([sys.executable, "-m", "lora_export", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("merge-and-export", "export-branched", "pack-adapter", "verify", "inspect", "demo", "make-adapter"):
        assert command in proc.stdout

"""Bad input across commands: one line on stderr, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
from cli_helpers import assert_one_line_error, run


def test_make_adapter_force_never_deletes_unrelated_files(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    result = run("make-adapter", "sample:gpt2", "-o", keep, "--force", ok=False)
    assert_one_line_error(result, r"exists and holds other files \(notes\.txt\): choose a new directory")
    assert (keep / "notes.txt").read_text() == "precious"
    run("make-adapter", "sample:gpt2", "-o", tmp_path / "ad")
    run("make-adapter", "sample:gpt2", "-o", tmp_path / "ad", "--force", "--seed", "2")  # its own output: fine


def test_outputs_are_readable_by_other_users(adapter_dir, tmp_path):
    out = tmp_path / "a.onnx_adapter"
    run("pack-adapter", adapter_dir, "-o", out)
    for path in (out, adapter_dir, adapter_dir / "adapter_model.safetensors"):
        assert path.stat().st_mode & stat.S_IROTH, path


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda cfg: [cfg], r"expected a JSON object"),
        (lambda cfg: {**cfg, "r": "four"}, r"r='four' is a str, not an integer"),
        (lambda cfg: {**cfg, "peft_type": "IA3"}, r"peft_type is 'IA3'; only LORA"),
        (lambda cfg: {**cfg, "lora_bias": True}, r"lora_bias=True is not supported \(only False\)"),
        (lambda cfg: {**cfg, "modules_to_save": 3}, r"modules_to_save must be a list of module names"),
    ],
)
def test_malformed_adapter_config(adapter_dir, tmp_path, edit, pattern):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(edit(cfg)))
    for args in (["inspect", bad], ["pack-adapter", bad, "-o", tmp_path / "x.npz"]):
        assert_one_line_error(run(*args, ok=False), pattern)
    assert not (tmp_path / "x.npz").exists()


def test_one_dimensional_lora_tensor(adapter_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = tensors[key].flatten()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    result = run("merge-and-export", "sample:gpt2", "--adapter", bad, "-o", tmp_path / "o.onnx", ok=False)
    assert_one_line_error(result, r"are not 2-D \(Linear\) or 4-D \(Conv2d\) weights")


def test_inspect_corrupt_or_missing_graph(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"garbage")
    assert_one_line_error(run("inspect", tmp_path / "g.onnx", ok=False), r"cannot read .*g\.onnx as ONNX")
    assert_one_line_error(run("inspect", tmp_path / "missing.onnx", ok=False), r"missing\.onnx does not exist")


def test_branched_conv2d_targets_are_refused(tmp_path):
    result = run("export-branched", "sample:convnet", "--targets", "conv1", "-o", tmp_path / "c.onnx", ok=False)
    assert_one_line_error(result, r"conv1 is a Conv2d: branched export supports Linear/Conv1D")
    assert list(tmp_path.iterdir()) == []


def test_targets_and_adapter_together_are_refused(adapter_dir, tmp_path):
    result = run(
        "export-branched",
        "sample:gpt2",
        "--adapter",
        adapter_dir,
        "--targets",
        "c_fc",
        "-o",
        tmp_path / "b.onnx",
        ok=False,
    )
    assert_one_line_error(result, r"give --adapter or --targets, not both")


def test_pack_adapter_dtype_follows_the_graph(adapter_dir, tmp_path):
    import onnxruntime as ort

    graph = tmp_path / "b16.onnx"
    run("export-branched", "sample:gpt2", "--adapter", adapter_dir, "-o", graph, "--dtype", "fp16", "--no-verify")
    result = run(
        "pack-adapter", adapter_dir, "-o", tmp_path / "x.onnx_adapter", "--graph", graph, "--dtype", "fp32", ok=False
    )
    assert_one_line_error(result, r"--dtype fp32 does not match .*fp16 LoRA inputs")
    assert not (tmp_path / "x.onnx_adapter").exists()
    run("pack-adapter", adapter_dir, "-o", tmp_path / "x.onnx_adapter", "--graph", graph)
    params = ort.AdapterFormat.read_adapter(str(tmp_path / "x.onnx_adapter")).get_parameters()
    assert {str(v.numpy().dtype) for v in params.values()} == {"float16"}


def test_pack_adapter_unknown_suffix_writes_nothing(adapter_dir, tmp_path):
    result = run("pack-adapter", adapter_dir, "-o", tmp_path / "sub" / "x.txt", ok=False)
    assert_one_line_error(result, r"unknown file type \.txt")
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_opset_is_refused(adapter_dir, tmp_path):
    result = run("merge-and-export", "sample:gpt2", "-o", tmp_path / "o.onnx", "--opset", "99", ok=False)
    assert result.exit_code == 2 and "99" in result.output
    assert list(tmp_path.iterdir()) == []

"""Merged export: our ONNX on ONNX Runtime == PEFT's unmerged forward, for every sample architecture."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from peft_oracle import build_peft, peft_forward, save_adapter

from lora_export.adapters import read_adapter
from lora_export.backends.onnxrt import OrtRunner
from lora_export.export.merged import export_merged
from lora_export.verify.check import make_feeds, verify_graph

PEFT_CONFIGS = {
    "gpt2": dict(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True),
    "llama": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={"gate_proj": 48},
    ),
    "bert": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["query", "value"]),
}


@pytest.fixture(scope="module")
def merged_graphs(sample_cache, tmp_path_factory):
    """Per arch: (PEFT model, adapter, merged graph path) — one export each."""
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for i, (arch, cfg) in enumerate(PEFT_CONFIGS.items()):
        loaded = sample_cache(arch)
        pm = build_peft(loaded, seed=100 + i, **cfg)
        adapter = read_adapter(save_adapter(pm, root / f"{arch}_adapter"))
        result = export_merged(loaded, adapter, root / f"{arch}.onnx")
        out[arch] = (pm, adapter, result)
    return out


@pytest.mark.parametrize("arch", list(PEFT_CONFIGS))
def test_merged_onnx_matches_peft_unmerged(merged_graphs, sample_cache, arch):
    loaded = sample_cache(arch)
    pm, _, result = merged_graphs[arch]
    with OrtRunner(result.path) as ort_runner:
        for batch, seq, seed in [(2, 16, 0), (3, 7, 1), (1, 29, 2)]:
            feeds = make_feeds(loaded, batch, seq, seed)
            got, ref = ort_runner.infer(feeds), peft_forward(pm, loaded, feeds)
            assert set(got) == set(ref) == set(loaded.output_names)
            for name in ref:
                np.testing.assert_allclose(got[name], ref[name], atol=1e-4, rtol=1e-4, err_msg=name)
    with pm.disable_adapter():  # the adapter really changes the outputs (B is not zero)
        base = peft_forward(pm, loaded, feeds)
    assert max(float(np.abs(base[k] - ref[k]).max()) for k in ref) > 1e-2


@pytest.mark.parametrize("arch", list(PEFT_CONFIGS))
def test_merged_graph_keeps_weight_names_dynamic_axes_and_manifest(merged_graphs, sample_cache, arch):
    loaded = sample_cache(arch)
    _, adapter, result = merged_graphs[arch]
    model = onnx.load(str(result.path))
    names = {t.name for t in model.graph.initializer}
    for path in adapter.modules:
        assert f"{path}.weight" in names  # no val_N renames: TensorRT refit addresses these
    assert not any(n.startswith("val_") and n.endswith(".weight") for n in names)
    for inp in model.graph.input:
        dims = [d.dim_param for d in inp.type.tensor_type.shape.dim]
        assert dims[:2] == ["batch", "sequence"], inp.name
    manifest = json.loads(result.path.with_name(result.path.name + ".json").read_text())
    assert manifest["kind"] == "merged" and manifest["adapters"][0]["sha256"] == adapter.sha256
    assert manifest["adapters"][0]["spec"]["r"] == PEFT_CONFIGS[arch]["r"]
    assert [o["name"] for o in manifest["outputs"]] == loaded.output_names
    assert manifest["opset"] and manifest["versions"]["lora_export"]


def test_verify_passes_and_reports_statistics(merged_graphs, sample_cache):
    loaded = sample_cache("gpt2")
    _, adapter, result = merged_graphs["gpt2"]
    report = verify_graph(loaded, result.path, [adapter])
    assert report.passed and len(report.cases) == 3
    stats = report.cases[0].outputs[0]
    assert stats.top1_agreement == 1.0 and stats.cosine > 0.9999 and stats.max_abs < 1e-4
    assert report.checks["adapter_effect"]["passed"]
    json.dumps(report.to_dict())


def test_verify_fails_when_the_graph_lacks_the_adapter(sample_cache, merged_graphs, tmp_path):
    loaded = sample_cache("gpt2")
    _, adapter, _ = merged_graphs["gpt2"]
    base = export_merged(loaded, None, tmp_path / "base.onnx")
    report = verify_graph(loaded, base.path, [adapter])
    assert not report.passed


def test_fp16_merged_export_within_fp16_tolerance(sample_cache, merged_graphs, tmp_path):
    loaded = sample_cache("gpt2")
    _, adapter, _ = merged_graphs["gpt2"]
    result = export_merged(loaded, adapter, tmp_path / "fp16.onnx", dtype="fp16")
    model = onnx.load(str(result.path))
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    report = verify_graph(loaded, result.path, [adapter])
    assert report.passed, report.to_dict()


def test_conv2d_merged_export_matches_peft(sample_cache, tmp_path):
    loaded = sample_cache("convnet")
    pm = build_peft(loaded, seed=5, r=4, lora_alpha=8, target_modules=["conv1", "conv2", "head"])
    adapter = read_adapter(save_adapter(pm, tmp_path / "a"))
    result = export_merged(loaded, adapter, tmp_path / "conv.onnx")
    with OrtRunner(result.path) as ort_runner:
        for batch, size in [(2, 16), (3, 11)]:
            feeds = make_feeds(loaded, batch, size, batch)
            np.testing.assert_allclose(
                ort_runner.infer(feeds)["logits"], peft_forward(pm, loaded, feeds)["logits"], atol=1e-4, rtol=1e-4
            )


def test_large_models_are_saved_with_external_data(sample_cache, merged_graphs, tmp_path, monkeypatch):
    """Over protobuf's 2 GB limit the weights go to `out.onnx.data` (threshold lowered to test it cheaply)."""
    from lora_export.artifacts import onnxio

    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD", 1024)
    loaded = sample_cache("gpt2")
    _, adapter, _ = merged_graphs["gpt2"]
    result = export_merged(loaded, adapter, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > (tmp_path / "big.onnx").stat().st_size
    assert verify_graph(loaded, result.path, [adapter], shapes=[(2, 5)]).passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "big.onnx.json"]

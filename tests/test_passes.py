"""Every pass keeps outputs (float32 1e-5, float16 within its tolerance) and the LoRA name contract, on the
three sample architectures, merged and branched, with a random adapter fed so the branches do work."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import ARCHS, make_random_adapter

from lora_export.backends.onnxrt import OrtRunner
from lora_export.errors import UserError
from lora_export.passes import (
    BakeAdapterPass,
    CleanupPass,
    ContractError,
    Float16Pass,
    FoldLoraScalePass,
    FuseSiblingBranchesPass,
    OrtFusionPass,
    check_preserved,
    snapshot,
)
from lora_export.passes.contract import find_branches, lora_node_count

PASSES = {
    "cleanup": (CleanupPass, {}),
    "scale_fold": (FoldLoraScalePass, {}),
    "sibling": (FuseSiblingBranchesPass, {}),
    "ort": (OrtFusionPass, {}),
}


@pytest.fixture(scope="module")
def adapters(sample_cache):
    return {arch: make_random_adapter(sample_cache(arch), r=4, alpha=8, seed=3) for arch in ARCHS}


@pytest.fixture(scope="module")
def merged_cache(tmp_path_factory, sample_cache, adapters):
    from lora_export.export.merged import export_merged

    root = tmp_path_factory.mktemp("merged")
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = root / f"{arch}_merged.onnx"
            export_merged(sample_cache(arch), adapters[arch], cache[arch])
        return cache[arch]

    return get


def _graph(kind, arch, export_cache, merged_cache):
    return export_cache(arch) if kind == "branched" else merged_cache(arch)


def _feeds(loaded, adapter, kind, batch=2, seq=9, seed=5):
    feeds = {k: v.numpy() for k, v in loaded.make_inputs(batch, seq, seed).items()}
    if kind == "branched":
        feeds.update(adapter.contract_tensors())
    return feeds


def _run(path, feeds):
    with OrtRunner(path) as r:
        return r.infer(feeds)


def _save(model, path):
    ir.save(model, path)
    return path


def _assert_close(a, b, atol=1e-5, rtol=1e-5):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k].astype(np.float32), a[k].astype(np.float32), atol=atol, rtol=rtol, err_msg=k)


@pytest.mark.parametrize("kind", ["branched", "merged"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_pass_keeps_outputs_and_contract(
    arch, kind, export_cache, merged_cache, sample_cache, adapters, tmp_path
):
    src = _graph(kind, arch, export_cache, merged_cache)
    feeds = _feeds(sample_cache(arch), adapters[arch], kind)
    ref = _run(src, feeds)
    if kind == "branched":  # the fed adapter changes the outputs: the branch is live
        base = _run(src, {k: v for k, v in feeds.items() if ".lora_" not in k})
        assert max(np.abs(ref[k] - base[k]).max() for k in ref) > 1e-3
    for name, (cls, kw) in PASSES.items():
        model = ir.load(src)
        before = snapshot(model)
        result = cls(**kw)(model)
        check_preserved(before, result.model)
        got = _run(_save(result.model, tmp_path / f"{name}.onnx"), feeds)
        _assert_close(ref, got)


@pytest.mark.parametrize("kind", ["branched", "merged"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_within_tolerance_of_torch(arch, kind, export_cache, merged_cache, sample_cache, adapters, tmp_path):
    from lora_export.verify.check import verify_graph

    model = ir.load(_graph(kind, arch, export_cache, merged_cache))
    before = snapshot(model)
    Float16Pass()(model)
    CleanupPass()(model)
    check_preserved(before, model, dtype_changed=True)
    lora = [v for v in model.graph.inputs if ".lora_" in v.name]
    assert all(v.dtype == ir.DataType.FLOAT for v in lora)  # LoRA slots keep float32: packed adapters still load
    assert all(v.dtype == ir.DataType.FLOAT16 for v in model.graph.outputs)
    path = _save(model, tmp_path / "fp16.onnx")
    report = verify_graph(sample_cache(arch), path, [adapters[arch]], shapes=[(2, 9)])
    assert report.passed, report.worst()


@pytest.mark.parametrize("arch", ARCHS)
def test_bake_equals_merge_and_export(arch, export_cache, merged_cache, sample_cache, adapters, tmp_path):
    model = ir.load(export_cache(arch))
    before = snapshot(model)
    BakeAdapterPass(adapters[arch])(model)
    check_preserved(before, model, lora_removed=True, weights_changed=True)
    assert not [v for v in model.graph.inputs if ".lora_" in v.name]
    merged = ir.load(merged_cache(arch))
    for name in before.weights:  # float32 arithmetic as merge_adapter does it: identical weights
        np.testing.assert_array_equal(
            model.graph.initializers[name].const_value.numpy(), merged.graph.initializers[name].const_value.numpy()
        )
    feeds = _feeds(sample_cache(arch), adapters[arch], "merged")
    _assert_close(_run(merged_cache(arch), feeds), _run(_save(model, tmp_path / "baked.onnx"), feeds))


def test_bake_refuses_bank_graphs_and_foreign_adapters(export_cache, sample_cache, adapters):
    with pytest.raises(UserError, match="bank"):
        BakeAdapterPass(adapters["gpt2"])(ir.load(export_cache("gpt2", "bank")))
    with pytest.raises(UserError, match="no LoRA slot"):
        BakeAdapterPass(adapters["llama"])(ir.load(export_cache("gpt2")))


def test_sibling_fusion_on_llama_drops_matmuls_and_keeps_defaults(export_cache, sample_cache, adapters, tmp_path):
    src = export_cache("llama")
    model = ir.load(src)
    assert lora_node_count(model) == {"nodes": 8, "matmuls": 8}
    p = FuseSiblingBranchesPass()
    p(model)
    assert len(p.notes) == 2  # q_proj + v_proj per layer
    assert lora_node_count(model)["matmuls"] == 6  # 2 layers: 2 x·A -> 1, B side unchanged
    path = _save(model, tmp_path / "fused.onnx")
    loaded = sample_cache("llama")
    for kind in ("branched", "merged"):  # with an adapter, and with the rank-0 defaults (no adapter)
        feeds = _feeds(loaded, adapters["llama"], kind)
        _assert_close(_run(src, feeds), _run(path, feeds))
    # gpt2 has one target per block (c_attn): nothing to fuse
    g = ir.load(export_cache("gpt2"))
    assert not FuseSiblingBranchesPass()(g).modified


def test_check_catches_dedupe_of_equal_lora_defaults(export_cache):
    """onnx-ir's initializer dedupe would merge the all-zero LoRA defaults; the contract check refuses it."""
    import onnx_ir.passes.common as common

    model = ir.load(export_cache("llama"))
    before = snapshot(model)
    common.DeduplicateInitializersPass()(model)
    with pytest.raises(ContractError):
        check_preserved(before, model)


def test_check_catches_folded_transpose(export_cache):
    model = ir.load(export_cache("bert"))
    before = snapshot(model)
    for node in list(model.graph):  # what the exporter's own optimizer does: fold Transpose(W) into val_N
        if node.op_type == "Transpose" and node.inputs[0].name.endswith("query.weight"):
            w = node.inputs[0]
            new = ir.Value(name=f"val_{id(node)}", const_value=ir.tensor(w.const_value.numpy().T.copy()))
            model.graph.register_initializer(new)
            ir.convenience.replace_all_uses_with(node.outputs[0], new)
            model.graph.remove(node, safe=True)
            model.graph.initializers.pop(w.name)
            break
    with pytest.raises(ContractError, match="renamed or folded away"):
        check_preserved(before, model)


def test_find_branches_sees_every_slot(export_cache):
    model = ir.load(export_cache("bert"))
    branches = find_branches(model)
    assert len(branches) == 4 and all(b.join is not None for b in branches)

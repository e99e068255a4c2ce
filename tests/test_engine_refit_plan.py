"""Refit plans checked against real exports: base graph + refit values == the merged graph's initializers.

No TensorRT: an "engine" here is the dict of weight values a refit would leave behind, starting from the
base graph; a refit sets exactly `plan.values`. The X -> Y -> X sequence pins the blended-adapter bug
(NVIDIA/TensorRT#3628): after it the weights must equal a fresh merged export of X.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_random_adapter
from onnx import numpy_helper

from lora_export.artifacts.fileio import manifest_path, read_json
from lora_export.backends.onnxrt import session_options
from lora_export.engines.graph import graph_inputs, precision_of, prepare_graph
from lora_export.engines.refit_plan import (
    GraphWeights,
    branched_refit_plan,
    changed_weights,
    merged_refit_plan,
    restoration_set,
    weight_layout,
)
from lora_export.errors import AdapterError, UserError
from lora_export.export.merged import export_merged
from lora_export.verify.check import make_feeds

GPT2_X = ["c_attn", "c_proj"]  # attn.c_attn, attn.c_proj, mlp.c_proj
GPT2_Y = ["c_fc"]


@pytest.fixture(scope="module")
def gpt2(sample_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("refit_gpt2")
    loaded = sample_cache("gpt2")
    x = make_random_adapter(loaded, r=4, targets=GPT2_X, seed=1, name="x")
    y = make_random_adapter(loaded, r=8, targets=GPT2_Y, seed=2, name="y")
    graphs = {
        "base": export_merged(loaded, None, root / "base.onnx").path,
        "x": export_merged(loaded, x, root / "x.onnx").path,
        "y": export_merged(loaded, y, root / "y.onnx").path,
    }
    return dict(
        loaded=loaded, x=x, y=y, graphs=graphs, w={k: GraphWeights(onnx.load(str(p))) for k, p in graphs.items()}
    )


@pytest.fixture(scope="module")
def llama(sample_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("refit_llama")
    loaded = sample_cache("llama")
    x = make_random_adapter(loaded, r=4, targets=["q_proj", "v_proj", "down_proj"], seed=3, name="x")
    graphs = {
        "base": export_merged(loaded, None, root / "base.onnx").path,
        "x": export_merged(loaded, x, root / "x.onnx").path,
    }
    return dict(x=x, w={k: GraphWeights(onnx.load(str(p))) for k, p in graphs.items()})


def _state(weights: GraphWeights) -> dict[str, np.ndarray]:
    return {n: weights.array(n) for n in weights.protos}


def _assert_state_equals(state, weights: GraphWeights, atol=1e-6):
    assert set(state) == set(weights.protos)
    for name in weights.protos:
        np.testing.assert_allclose(state[name], weights.array(name), atol=atol, rtol=0, err_msg=name)


def test_layouts_come_from_the_graph(gpt2, llama):
    assert weight_layout(gpt2["w"]["base"], "transformer.h.0.attn.c_attn.weight") == "in_out"  # Conv1D [in, out]
    assert weight_layout(llama["w"]["base"], "model.layers.0.self_attn.q_proj.weight") == "out_in"  # via Transpose
    with pytest.raises(UserError, match="cannot tell how the graph uses"):
        weight_layout(gpt2["w"]["base"], "transformer.wte.weight")  # read by Gather: not a matmul weight


def test_gpt2_base_plus_refit_equals_merged_export(gpt2):
    state = _state(gpt2["w"]["base"])
    plan = merged_refit_plan(gpt2["w"]["base"], gpt2["x"], previous=[])
    assert sorted(plan.adapted) == sorted(f"{p}.weight" for p in gpt2["x"].modules)
    assert plan.restored == []
    state.update(plan.values)
    _assert_state_equals(state, gpt2["w"]["x"])


def test_llama_transposed_weights_match_merged_export(llama):
    state = _state(llama["w"]["base"])
    plan = merged_refit_plan(llama["w"]["base"], llama["x"], previous=[])
    assert all(v.shape == llama["w"]["base"].array(n).shape for n, v in plan.values.items())
    state.update(plan.values)
    _assert_state_equals(state, llama["w"]["x"])


def test_x_then_y_then_x_restores_base_weights(gpt2):
    """The blended-adapters sequence: each step must equal a fresh merged export of that adapter."""
    base = gpt2["w"]["base"]
    state = _state(base)
    current: list[str] = []
    for name in ("x", "y", "x"):
        plan = merged_refit_plan(base, gpt2[name], previous=current)
        assert plan.restored == restoration_set(current, plan.adapted)
        assert set(plan.values) == set(plan.adapted) | set(plan.restored)
        state.update(plan.values)
        _assert_state_equals(state, gpt2["w"][name])
        current = plan.adapted
    x_names = {f"{p}.weight" for p in gpt2["x"].modules}
    y_names = {f"{p}.weight" for p in gpt2["y"].modules}
    assert restoration_set(x_names, y_names) == sorted(x_names)  # disjoint targets: all of X goes back
    assert restoration_set(y_names, x_names) == sorted(y_names)
    back = merged_refit_plan(base, None, previous=current)  # and back to the base model
    state.update(back.values)
    _assert_state_equals(state, base, atol=0)


def test_changed_weights_finds_the_baked_adapter(gpt2):
    assert changed_weights(gpt2["w"]["x"], gpt2["w"]["base"]) == sorted(f"{p}.weight" for p in gpt2["x"].modules)
    assert changed_weights(gpt2["w"]["base"], gpt2["w"]["base"]) == []


def test_merged_plan_errors(gpt2, llama):
    with pytest.raises(AdapterError, match="no initializer"):
        merged_refit_plan(gpt2["w"]["base"], llama["x"], previous=[])
    with pytest.raises(UserError, match="cannot restore"):
        merged_refit_plan(gpt2["w"]["base"], None, previous=["not.a.weight"])


# -- branched graphs --------------------------------------------------------------------------------------
def _run(model: onnx.ModelProto, feeds):
    opts = session_options()
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def test_branched_as_weights_with_refit_values_equals_branched_with_inputs(export_cache, sample_cache):
    """The --lora-as weights rewrite, filled with a plan's padded A/B, computes what the inputs graph does."""
    path = export_cache("gpt2")
    manifest = read_json(manifest_path(path))
    loaded = sample_cache("gpt2")
    x = make_random_adapter(loaded, r=4, seed=5, name="x")
    y = make_random_adapter(loaded, r=8, seed=6, name="y", targets=["c_attn"])
    feeds = make_feeds(loaded, 2, 7, 0)
    original = onnx.load(str(path))
    prepared = prepare_graph(onnx.load(str(path)), manifest, lora_as="weights", lora_rank=8)
    assert [i["name"] for i in graph_inputs(prepared.model)] == ["input_ids", "attention_mask"]
    assert prepared.lora_rank == 8 and prepared.weights_dtype == "float32"
    assert precision_of(prepared.model) == "fp32"
    current: list[str] = []
    for adapter in (x, y, None):
        plan = branched_refit_plan(manifest["lora_modules"], 8, "float32", adapter, current)
        for t in prepared.model.graph.initializer:
            if t.name in plan.values:
                t.CopyFrom(numpy_helper.from_array(plan.values[t.name], t.name))
        want = _run(original, {**feeds, **(adapter.contract_tensors() if adapter else {})})
        if adapter is not None:
            assert np.abs(want - _run(original, feeds)).max() > 1e-2  # the adapter visibly matters
        np.testing.assert_allclose(_run(prepared.model, feeds), want, atol=2e-5, rtol=1e-5)
        current = plan.adapted


def test_branched_as_inputs_keeps_lora_inputs_without_defaults(export_cache, sample_cache):
    path = export_cache("gpt2")
    manifest = read_json(manifest_path(path))
    prepared = prepare_graph(onnx.load(str(path)), manifest, lora_as="inputs")
    names = {i["name"] for i in graph_inputs(prepared.model)}
    assert {m["name"] for m in manifest["lora_inputs"]} <= names
    assert not any(".lora_" in t.name for t in prepared.model.graph.initializer)
    loaded = sample_cache("gpt2")
    feeds = make_feeds(loaded, 2, 5, 1)
    rank0 = {
        i["name"]: np.zeros([0 if isinstance(d, str) else d for d in i["shape"]], np.float32)
        for i in manifest["lora_inputs"]
    }
    np.testing.assert_allclose(_run(prepared.model, {**feeds, **rank0}), _run(onnx.load(str(path)), feeds), atol=1e-6)


def test_branched_plan_errors(export_cache, sample_cache):
    manifest = read_json(manifest_path(export_cache("gpt2")))
    loaded = sample_cache("gpt2")
    with pytest.raises(AdapterError, match="exceeds the engine's LoRA rank"):
        branched_refit_plan(manifest["lora_modules"], 4, "float32", make_random_adapter(loaded, r=8), [])
    with pytest.raises(AdapterError, match="no LoRA slot"):
        branched_refit_plan(manifest["lora_modules"], 8, "float32", make_random_adapter(loaded, targets=["c_fc"]), [])
    with pytest.raises(UserError, match="--lora-as weights needs a branched graph"):
        prepare_graph(onnx.load(str(export_cache("gpt2", "bank"))), {"kind": "branched-bank"}, lora_as="weights")


# -- what build-engine decides before TensorRT runs -----------------------------------------------------------
def test_plan_build_for_merged_and_branched_graphs(gpt2, export_cache):
    from lora_export.engines.build import BuildOptions, plan_build

    plan = plan_build(gpt2["graphs"]["x"], BuildOptions(refit=True), (10, 8, 0))
    assert plan.prepared.kind == "merged" and plan.precision == "fp32"
    assert plan.flags.builder_flags == ("REFIT",) and plan.flags.network_flags == ()
    assert [p.name for p in plan.profiles] == ["input_ids", "attention_mask"]

    branched = export_cache("gpt2")
    plan = plan_build(branched, BuildOptions(shapes=["r:1,4,16", "sequence:1,64,256"]), (11, 0, 0))
    ranks = {p.name: p for p in plan.profiles if ".lora_" in p.name}
    assert ranks and all(16 in p.max and 4 in p.opt and 1 in p.min for p in ranks.values())
    assert plan.flags.strongly_typed and plan.flags.network_flags == ()

    plan = plan_build(branched, BuildOptions(refit=True, lora_as="weights", lora_rank=8), (10, 8, 0))
    assert [p.name for p in plan.profiles] == ["input_ids", "attention_mask"]
    with pytest.raises(UserError, match="add --refit"):
        plan_build(branched, BuildOptions(lora_as="weights"), (10, 8, 0))
    with pytest.raises(UserError, match="r_9"):
        plan_build(branched, BuildOptions(shapes=["r_9:1,1,1"]), (10, 8, 0))


def test_precision_follows_the_bulk_of_the_weights():
    from onnx import TensorProto, helper

    def graph(weight_type, out_type):
        w = helper.make_tensor("w", weight_type, [64, 64], [0.0] * 4096)
        s = helper.make_tensor("s", TensorProto.FLOAT, [1], [1.0])  # a small fp32 constant does not decide
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        g = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", weight_type, [1, 64])],
            [helper.make_tensor_value_info("y", out_type, [1, 64])],
            [w, s],
        )
        return helper.make_model(g)

    assert precision_of(graph(TensorProto.FLOAT16, TensorProto.FLOAT16)) == "fp16"
    assert precision_of(graph(TensorProto.FLOAT, TensorProto.FLOAT)) == "fp32"
    assert precision_of(graph(TensorProto.BFLOAT16, TensorProto.BFLOAT16)) == "bf16"

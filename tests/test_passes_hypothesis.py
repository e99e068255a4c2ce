"""Random small hand-built LoRA graphs (onnx.helper): the whole pipeline keeps outputs and the contract."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lora_export.passes import FoldLoraScalePass, PipelineOptions, optimize_model, snapshot
from lora_export.passes.contract import check_preserved, lora_node_count


def build(spec: dict) -> onnx.ModelProto:
    """x (B, d_in) -> per module k: y_k = x·W_k [+ b_k] + ((x·A_k)·B_k) [· s_k]; output Concat(y_k)."""
    rng = np.random.default_rng(spec["seed"])
    d_in = spec["d_in"]
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])]
    outs = []
    for k, m in enumerate(spec["modules"]):
        p, d_out = f"blk.{k}.proj", m["d_out"]
        w = rng.standard_normal((d_out, d_in)).astype(np.float32) * 0.3
        if m["linear"]:  # nn.Linear: [out, in] under a Transpose
            inits.append(numpy_helper.from_array(w, f"{p}.weight"))
            nodes.append(helper.make_node("Transpose", [f"{p}.weight"], [f"{p}.wt"], perm=[1, 0]))
            nodes.append(helper.make_node("MatMul", ["x", f"{p}.wt"], [f"{p}.base0"]))
        else:  # Conv1D: [in, out] used directly
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{p}.weight"))
            nodes.append(helper.make_node("MatMul", ["x", f"{p}.weight"], [f"{p}.base0"]))
        base = f"{p}.base0"
        if m["bias"]:
            inits.append(numpy_helper.from_array(rng.standard_normal(d_out).astype(np.float32), f"{p}.bias"))
            nodes.append(helper.make_node("Add", [base, f"{p}.bias"], [f"{p}.base"]))
            base = f"{p}.base"
        a, b = f"{p}.lora_A.weight", f"{p}.lora_B.weight"
        for name, shape, dflt in ((a, [d_in, f"r_{k}"], (d_in, 0)), (b, [f"r_{k}", d_out], (0, d_out))):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            inits.append(numpy_helper.from_array(np.zeros(dflt, np.float32), name))
        nodes.append(helper.make_node("MatMul", ["x", a], [f"{p}.h"]))
        nodes.append(helper.make_node("MatMul", [f"{p}.h", b], [f"{p}.d"]))
        branch = f"{p}.d"
        if m["scale"] is not None:
            inits.append(numpy_helper.from_array(np.array(m["scale"], np.float32), f"{p}.s"))
            nodes.append(helper.make_node("Mul", [branch, f"{p}.s"], [f"{p}.ds"]))
            branch = f"{p}.ds"
        nodes.append(helper.make_node("Add", [base, branch], [f"y{k}"]))
        outs.append(f"y{k}")
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=1))
    total = sum(m["d_out"] for m in spec["modules"])
    graph = helper.make_graph(
        nodes, "lora", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", total])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["y"], feeds)[0]


module = st.fixed_dictionaries(
    {
        "d_out": st.integers(1, 6),
        "linear": st.booleans(),
        "bias": st.booleans(),
        "scale": st.none() | st.floats(0.25, 4.0),
        "rank": st.integers(0, 3),
    }
)
specs = st.fixed_dictionaries(
    {"seed": st.integers(0, 2**16), "d_in": st.integers(1, 6), "modules": st.lists(module, min_size=1, max_size=3)}
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, fuse=st.booleans())
def test_pipeline_on_random_lora_graphs(spec, fuse):
    proto = build(spec)
    onnx.checker.check_model(proto)
    rng = np.random.default_rng(spec["seed"] + 1)
    feeds = {"x": rng.standard_normal((3, spec["d_in"])).astype(np.float32)}
    for k, m in enumerate(spec["modules"]):
        p = f"blk.{k}.proj"
        feeds[f"{p}.lora_A.weight"] = rng.standard_normal((spec["d_in"], m["rank"])).astype(np.float32)
        feeds[f"{p}.lora_B.weight"] = rng.standard_normal((m["rank"], m["d_out"])).astype(np.float32)
    expected = run(proto, feeds)
    model = ir.serde.deserialize_model(proto)
    before = snapshot(model)
    n_lora = lora_node_count(model)
    model, report = optimize_model(model, PipelineOptions(fuse_siblings=fuse))
    check_preserved(before, model)
    got = run(ir.serde.serialize_model(model), feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if fuse and len(spec["modules"]) > 1:  # all modules read x: one x·A MatMul
        assert lora_node_count(model)["matmuls"] == len(spec["modules"]) + 1
    else:
        assert lora_node_count(model)["matmuls"] == n_lora["matmuls"]
    if any(m["scale"] is not None for m in spec["modules"]):  # B is an input here: never folded, said why
        assert any("graph input" in n for n in report["notes"])


@settings(max_examples=15, deadline=None)
@given(spec=specs)
def test_scale_folds_into_constant_b(spec):
    """Rule 1/2: with B a constant (as PEFT-traced graphs have it), Mul(s) disappears into B."""
    spec = {**spec, "modules": [{**m, "scale": m["scale"] or 2.0, "rank": max(m["rank"], 1)} for m in spec["modules"]]}
    proto = build(spec)
    rng = np.random.default_rng(spec["seed"] + 2)
    for k, m in enumerate(spec["modules"]):  # turn the LoRA inputs into constants
        p = f"blk.{k}.proj"
        for name, shape in (
            (f"{p}.lora_A.weight", (spec["d_in"], m["rank"])),
            (f"{p}.lora_B.weight", (m["rank"], m["d_out"])),
        ):
            i = next(j for j, t in enumerate(proto.graph.initializer) if t.name == name)
            proto.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
            )
        for j in reversed(range(len(proto.graph.input))):
            if proto.graph.input[j].name.startswith(p + ".lora"):
                del proto.graph.input[j]
    feeds = {"x": rng.standard_normal((2, spec["d_in"])).astype(np.float32)}
    expected = run(proto, feeds)
    model = ir.serde.deserialize_model(proto)
    result = FoldLoraScalePass()(model)
    assert result.modified
    assert not [n for n in model.graph if n.op_type == "Mul"]
    np.testing.assert_allclose(run(ir.serde.serialize_model(model), feeds), expected, rtol=1e-5, atol=1e-5)

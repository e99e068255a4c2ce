"""The transformer fusions on exported gpt2 / llama / bert / qwen2 graphs: the fused graph loads in ONNX Runtime,
stays within 1e-4 of the unfused graph (padded rows included), keeps every LoRA input, default and branch
MatMul, and a branched graph fed a PEFT adapter after fusion still computes what PEFT computes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from peft_oracle import build_peft, peft_forward, save_adapter

from lora_export.backends.onnxrt import OrtRunner
from lora_export.passes.contract import check_preserved, count_ops, lora_inputs, lora_node_count, snapshot
from lora_export.passes.transformer_fusion import TransformerFusionPass

# what each architecture must gain (ONNX Runtime ops)
EXPECTED = {
    "gpt2": {"MultiHeadAttention", "SkipLayerNormalization", "FastGelu"},
    "llama": {"MultiHeadAttention", "SkipSimplifiedLayerNormalization", "RotaryEmbedding", "QuickGelu"},
    "qwen2": {"MultiHeadAttention", "SkipSimplifiedLayerNormalization", "RotaryEmbedding", "QuickGelu"},
    "bert": {"MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"},
}
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "bert": ["query", "value"]}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A tiny Qwen2 (GQA, q/k/v biases) saved as a transformers directory and loaded like a user's model."""
    import torch

    from lora_export.models import load_model
    from lora_export.models.zoo import build_sample

    model, _ = build_sample("qwen2")  # the zoo's tiny Qwen2
    with torch.no_grad():  # transformers starts biases at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("qwen2") / "model"
    model.save_pretrained(out)
    return load_model(str(out))


@pytest.fixture(scope="module")
def fused(tmp_path_factory, export_cache, sample_cache, qwen2):
    """arch -> (loaded, branched graph, fused graph, pass)."""
    from lora_export.export.branched import export_branched

    root = tmp_path_factory.mktemp("fused")
    cache = {}

    def get(arch):
        if arch not in cache:
            loaded = qwen2 if arch == "qwen2" else sample_cache(arch)
            if arch == "qwen2":
                src = root / "qwen2.onnx"
                export_branched(loaded, src, targets=TARGETS[arch])
            else:
                src = export_cache(arch)
            p = TransformerFusionPass()
            model = p(ir.load(src)).model
            out = root / f"{arch}.fused.onnx"
            ir.save(model, out)
            cache[arch] = (loaded, src, out, p)
        return cache[arch]

    return get


def _run(path, feeds):
    with OrtRunner(path) as r:
        return r.infer(feeds)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "qwen2"])
def test_fused_graph_matches_unfused_and_keeps_lora_slots(arch, fused):
    loaded, src, out, p = fused(arch)
    before, after = ir.load(src), ir.load(out)
    assert EXPECTED[arch] <= set(count_ops(after)), p.notes
    assert not [n for n in p.notes if "rolled back" in n], p.notes
    assert len(after.graph) < len(before.graph)
    check_preserved(snapshot(before), after)  # LoRA inputs + rank-0 defaults + base weight names
    assert [v.name for v in lora_inputs(after)] == [v.name for v in lora_inputs(before)]
    assert lora_node_count(after) == lora_node_count(before)  # every branch MatMul still there
    rng = np.random.default_rng(1)
    lora = {}
    for v in lora_inputs(before):  # a random adapter of rank 3, so the branches do work
        dims = [d if isinstance(d, int) else 3 for d in v.shape]
        lora[v.name] = (rng.standard_normal(dims) * 0.2).astype(np.float32)
    for seed, (batch, seq) in enumerate([(3, 11), (1, 5)]):
        feeds = {k: v.numpy() for k, v in loaded.make_inputs(batch, seq, seed).items()}  # rows right-padded
        for extra in (lora, {}):
            ref, got = _run(src, {**feeds, **extra}), _run(out, {**feeds, **extra})
            for k in ref:
                np.testing.assert_allclose(got[k], ref[k], atol=1e-4, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_branched_plus_adapter_after_fusion_equals_peft(arch, fused, tmp_path):
    from lora_export.adapters.peft_io import read_adapter

    loaded, _, out, _ = fused(arch)
    pm = build_peft(loaded, seed=11, r=4, lora_alpha=8, target_modules=TARGETS[arch])
    adapter = read_adapter(save_adapter(pm, tmp_path / "adapter"))
    feeds = {k: v.numpy() for k, v in loaded.make_inputs(2, 9, 4).items()}
    want = peft_forward(pm, loaded, feeds)
    got = _run(out, {**feeds, **adapter.contract_tensors()})
    base = _run(out, feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=1e-4, err_msg=k)
        assert np.abs(got[k] - base[k]).max() > 1e-2  # the adapter visibly moves the outputs

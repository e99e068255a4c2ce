"""The LoRA core against PEFT: target matching, the layer, merging, adapter files both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_random_adapter
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_oracle import build_peft, max_err, peft_forward, save_adapter
from torch import nn

from lora_export.adapters import read_adapter, write_peft_adapter
from lora_export.adapters.adapter import ModuleLora
from lora_export.adapters.inject import attach_adapter, merge_adapter
from lora_export.adapters.layer import BranchFeed, LoraLayer, merged_weight
from lora_export.adapters.spec import LoraSpec
from lora_export.backends.torch_runner import TorchRunner
from lora_export.verify.check import make_feeds


# -- target matching: PEFT's own rules, checked against PEFT --------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"),
        dict(target_modules=["q_proj", "o_proj", "down_proj"], layers_to_transform=[1]),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0, layers_pattern="layers"),
        dict(target_modules=["q_proj", "v_proj", "gate_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
    ],
)
def test_target_matching_agrees_with_peft(sample_cache, config):
    from peft.tuners.tuners_utils import check_target_module_exists

    loaded = sample_cache("llama")
    spec = LoraSpec(**config)

    class Cfg:  # the fields PEFT's matcher reads
        target_modules = config["target_modules"]
        layers_to_transform = config.get("layers_to_transform")
        layers_pattern = config.get("layers_pattern")
        exclude_modules = config.get("exclude_modules")
        modules_to_save = None
        target_parameters = None

    for path, _ in loaded.module.named_modules():
        if not path:
            continue
        peft_says = check_target_module_exists(Cfg, path)
        peft_says = bool(peft_says) and type(peft_says).__name__ != "_ExcludedModule"
        assert spec.matches(path) == peft_says, path


def test_rank_and_alpha_patterns():
    spec = LoraSpec(
        r=8, alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 2}, alpha_pattern={"v_proj": 32}
    )
    assert spec.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert spec.rank_for("model.layers.1.self_attn.v_proj") == 2
    assert spec.rank_for("model.layers.0.self_attn.v_proj") == 8
    assert spec.scaling_for("model.layers.0.self_attn.v_proj") == 32 / 8
    assert spec.scaling_for("model.layers.1.self_attn.v_proj") == 32 / 2
    rs = LoraSpec(r=16, alpha=8, use_rslora=True)
    assert rs.scaling_for("x") == pytest.approx(8 / 4)


# -- the layer: merged == branched, for every supported base layer ---------------------------------------------
def _conv1d(d_in: int, d_out: int):
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(d_out, d_in)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    r=st.integers(1, 12),
    alpha=st.floats(0.5, 64),
    rslora=st.booleans(),
    kind=st.sampled_from(["linear", "conv1d"]),
    seed=st.integers(0, 2**16),
)
def test_merged_equals_branched(d_in, d_out, r, alpha, rslora, kind, seed):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out) if kind == "linear" else _conv1d(d_in, d_out)
    spec = LoraSpec(r=r, alpha=alpha, use_rslora=rslora)
    lora = ModuleLora(A=torch.randn(r, d_in), B=torch.randn(d_out, r), scaling=spec.scaling_for("m"))
    layer = LoraLayer(base, "m")
    layer.set_lora(lora)
    x = torch.randn(3, 5, d_in)
    with torch.no_grad():
        branched = layer(x)
        # the contract form the graph computes: x·A' then ·B' with s folded into B'
        a, b = lora.contract_pair()
        feed = BranchFeed("inputs")
        feed.tensors = {"m.lora_A.weight": torch.from_numpy(a), "m.lora_B.weight": torch.from_numpy(b)}
        layer.feed, layer.lora = feed, None
        contract = layer(x)
        base.weight.data = merged_weight(base, lora)
        merged = base(x)
    torch.testing.assert_close(merged, branched, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(contract, branched, atol=1e-4, rtol=1e-4)


def test_conv2d_layer_and_merge_match_peft(sample_cache, tmp_path):
    loaded = sample_cache("convnet")
    pm = build_peft(loaded, seed=3, r=4, lora_alpha=8, target_modules=["conv1", "conv2"])
    adapter = read_adapter(save_adapter(pm, tmp_path / "a"))
    feeds = make_feeds(loaded, 2, 12, 0)
    with TorchRunner(loaded, adapter) as ours:
        assert max_err(ours.infer(feeds), peft_forward(pm, loaded, feeds)) < 1e-5
    merged = pm.merge_and_unload()
    import copy

    mine = copy.deepcopy(loaded.module)
    merge_adapter(mine, adapter)
    for name in ("conv1.weight", "conv2.weight"):
        torch.testing.assert_close(mine.state_dict()[name], merged.state_dict()[name], atol=1e-6, rtol=1e-5)


def test_merge_refuses_nonfinite_results():
    base = nn.Linear(4, 4).half()
    lora = ModuleLora(A=torch.full((2, 4), 300.0), B=torch.full((4, 2), 300.0), scaling=1.0)
    with pytest.raises(Exception, match="NaN/Inf"):
        merged_weight(base, lora, path="m")
    assert torch.isinf(merged_weight(base, lora, allow_nonfinite=True)).any()


# -- merged weights == PEFT's merge_and_unload, several ranks, rsLoRA on and off --------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("r,rslora", [(4, False), (8, True), (16, False)])
def test_merged_weights_equal_peft_merge_and_unload(sample, tmp_path, arch, r, rslora):
    loaded = sample(arch)
    targets = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"]}
    pm = build_peft(
        loaded,
        seed=r,
        r=r,
        lora_alpha=2 * r + 1,
        use_rslora=rslora,
        target_modules=targets[arch],
        fan_in_fan_out=arch == "gpt2",
    )
    adapter = read_adapter(save_adapter(pm, tmp_path / "a"))
    reference = pm.merge_and_unload().state_dict()
    merge_adapter(loaded.module, adapter)
    mine = loaded.module.state_dict()
    assert adapter.modules, "the adapter must adapt something"
    for path in adapter.modules:
        torch.testing.assert_close(mine[f"{path}.weight"], reference[f"{path}.weight"], atol=1e-6, rtol=1e-5)


# -- adapter files both ways ---------------------------------------------------------------------------------------
RANK_PATTERNS = {"gpt2": {r"h\.1\.attn\.c_attn": 3}, "llama": {"v_proj": 3}, "bert": {"value": 3}}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_adapter_we_write_loads_in_peft_with_identical_outputs(sample_cache, tmp_path, arch):
    from peft import PeftModel

    loaded = sample_cache(arch)
    adapter = make_random_adapter(loaded, r=6, alpha=12, seed=11, rank_pattern=RANK_PATTERNS[arch])
    out = write_peft_adapter(adapter, tmp_path / "ours", base_model="sample")
    import copy

    pm = PeftModel.from_pretrained(copy.deepcopy(loaded.module), str(out)).eval()
    feeds = make_feeds(loaded, 2, 9, 4)
    with TorchRunner(loaded, adapter) as ours:
        assert max_err(ours.infer(feeds), peft_forward(pm, loaded, feeds)) < 1e-5
    # and it reads back to the same tensors and scaling
    back = read_adapter(out)
    for path, m in adapter.modules.items():
        torch.testing.assert_close(back.modules[path].A, m.A)
        assert back.modules[path].scaling == pytest.approx(m.scaling)


def test_peft_rank_and_alpha_pattern_adapter_reads_with_per_module_scaling(sample_cache, tmp_path):
    loaded = sample_cache("llama")
    pm = build_peft(
        loaded,
        seed=2,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 40},
    )
    adapter = read_adapter(save_adapter(pm, tmp_path / "a"))
    assert adapter.modules["model.layers.0.self_attn.v_proj"].r == 4
    assert adapter.modules["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(16 / 4)
    assert adapter.modules["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(40 / 8)
    feeds = make_feeds(loaded, 2, 9, 4)
    with TorchRunner(loaded, adapter) as ours:
        assert max_err(ours.infer(feeds), peft_forward(pm, loaded, feeds)) < 1e-5


def test_legacy_bin_adapter_reads_weights_only(sample_cache, tmp_path):
    loaded = sample_cache("gpt2")
    adapter = make_random_adapter(loaded, seed=1)
    out = write_peft_adapter(adapter, tmp_path / "a")
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    (out / "adapter_model.safetensors").unlink()
    torch.save(tensors, out / "adapter_model.bin")
    back = read_adapter(out)
    assert set(back.modules) == set(adapter.modules)


def test_attach_adapter_matches_contract_tensors(sample_cache):
    loaded = sample_cache("gpt2")
    adapter = make_random_adapter(loaded, r=4, seed=9)
    tensors = adapter.contract_tensors()
    for path, m in adapter.modules.items():
        a, b = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
        assert a.shape == (m.in_features, m.r) and b.shape == (m.r, m.out_features)
        np.testing.assert_allclose(a @ b, m.delta_weight().numpy().T, rtol=1e-5, atol=1e-6)
    import copy

    model = copy.deepcopy(loaded.module)
    layers = attach_adapter(model, adapter)
    assert set(layers) == set(adapter.modules)

"""Decoder folders with DoRA and embedding LoRA generate what PEFT generates, and the decoder path covers the
architectures beyond gpt2/llama/qwen2 (greedy, fp32, one left-padded batch against PEFT on each prompt alone)."""

from __future__ import annotations

import pytest
from arch_zoo import build
from decoder_setup import peft_generate
from peft_oracle import add_peft_adapter, build_peft, fill_lora, move_dora_magnitudes, save_adapter

from lora_export.adapters import read_adapter
from lora_export.export.decoder import export_decoder
from lora_export.runtime import Generator

PROMPTS = [[11, 23, 5, 64, 8, 9, 7], [3, 17, 25], [41, 42, 43, 44]]
NEW = 10


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder_kinds")
    loaded = build("llama", num_hidden_layers=2)
    pm = build_peft(loaded, seed=5, adapter_name="d", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                    use_dora=True)  # fmt: skip
    fill_lora(pm, 5, "d", b_std=0.3)
    move_dora_magnitudes(pm, "d", 6)
    add_peft_adapter(pm, "e", 7, r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])
    fill_lora(pm, 7, "e", b_std=0.3)
    adapters = [read_adapter(save_adapter(pm, root / "adapters", n), name=n) for n in ("d", "e")]
    return dict(loaded=loaded, pm=pm, adapters=adapters, root=root)


@pytest.mark.parametrize("layout", ["inputs", "bank"])
def test_dora_and_embedding_adapters_generate_as_peft(llama, layout):
    folder = export_decoder(llama["loaded"], llama["root"] / layout, adapters=llama["adapters"], layout=layout).path
    rows = ["d", "e", None]
    want = [peft_generate(llama["pm"], p, NEW, a) for p, a in zip(PROMPTS, rows)]
    assert want[0] != peft_generate(llama["pm"], PROMPTS[0], NEW, None)  # DoRA moves the tokens
    assert want[1] != peft_generate(llama["pm"], PROMPTS[1], NEW, None)  # so does the embedding adapter
    with Generator(folder) as gen:
        if layout == "bank":
            got = gen.generate(PROMPTS, adapters=rows, max_new_tokens=NEW, ignore_eos=True).tokens
        else:
            got = [gen.generate([p], adapter=a, max_new_tokens=NEW, ignore_eos=True).tokens[0]
                   for p, a in zip(PROMPTS, rows)]  # fmt: skip
    assert got == want


@pytest.mark.parametrize("arch", ["phi3", "gemma2"])  # fused qkv/gate_up; sliding + global layers, soft-capping
def test_more_decoder_architectures_generate_as_peft(tmp_path, arch):
    loaded = build(arch, num_hidden_layers=2)
    pm = build_peft(loaded, seed=3, adapter_name="x", r=4, lora_alpha=8, target_modules="all-linear")  # fmt: skip
    fill_lora(pm, 3, "x", b_std=0.3)
    adapter = read_adapter(save_adapter(pm, tmp_path / "adapters", "x"), name="x")
    folder = export_decoder(loaded, tmp_path / "bank", adapters=[adapter], layout="bank").path
    rows = ["x", None, "x"]
    want = [peft_generate(pm, p, NEW, a) for p, a in zip(PROMPTS, rows)]
    assert want[0] != peft_generate(pm, PROMPTS[0], NEW, None)
    with Generator(folder) as gen:
        assert gen.generate(PROMPTS, adapters=rows, max_new_tokens=NEW, ignore_eos=True).tokens == want

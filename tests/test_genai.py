"""ONNX Runtime GenAI runs our decoder folders as they are and generates our greedy tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from decoder_setup import PROMPTS

from lora_export.runtime import Generator

og = pytest.importorskip("onnxruntime_genai")

NEW = 16


def _genai_tokens(folder, prompt, adapter_file=None):
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW, do_sample=False)
    generator = og.Generator(model, params)
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "x")
        generator.set_active_adapter(adapters, "x")
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt) :]


def test_genai_config_holds_only_genai_keys(decoders):
    config = json.loads((decoders.folder("gpt2", "inputs") / "genai_config.json").read_text())
    assert set(config) == {"model", "search"}
    assert config["model"]["type"] == "decoder" and config["search"]["past_present_share_buffer"] is False
    decoder = config["model"]["decoder"]
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 4, 16)
    assert config["model"]["vocab_size"] == 1000


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[1]])
def test_genai_greedy_tokens_equal_ours_without_adapter(decoders, prompt):
    folder = decoders.folder("gpt2", "merged")
    with Generator(folder) as gen:
        ours = gen.generate(prompt, max_new_tokens=NEW).tokens[0]
    assert _genai_tokens(folder, prompt) == ours


def test_genai_with_our_onnx_adapter_equals_ours(decoders):
    folder = decoders.folder("llama", "inputs")
    with Generator(folder) as gen:
        ours = gen.generate(PROMPTS[0], adapter="x", max_new_tokens=NEW).tokens[0]
        base = gen.generate(PROMPTS[0], max_new_tokens=NEW).tokens[0]
    assert ours != base
    assert _genai_tokens(folder, PROMPTS[0], folder / "adapters" / "x.onnx_adapter") == ours
    assert _genai_tokens(folder, PROMPTS[0]) == base

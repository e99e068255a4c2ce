"""Configs the tiny samples do not have: special ids outside the vocabulary, tokenizers without token types,
classification heads saved whole by the adapter (`modules_to_save`)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import make_random_adapter

from lora_export import api
from lora_export.errors import UserError
from lora_export.models.loading import wrap_transformers


@pytest.fixture(scope="module")
def gpt2_small_vocab(tmp_path_factory):
    """GPT-2 with a 400-token vocabulary whose config keeps GPT-2's bos/eos 50256 (outside it), decoder folder."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=400, n_positions=128, bos_token_id=50256, eos_token_id=50256
    )
    loaded = wrap_transformers(transformers.GPT2LMHeadModel(cfg).eval(), "gpt2-v400")
    adapter = make_random_adapter(loaded, seed=5)
    outcome = api.export_decoder(loaded, tmp_path_factory.mktemp("v400") / "f", adapters=[adapter])
    return loaded, adapter, outcome


def test_special_ids_outside_the_vocabulary_pad_with_a_valid_id(gpt2_small_vocab):
    _, _, outcome = gpt2_small_vocab
    assert outcome.report.passed, [c.reason for c in outcome.report.cases]  # padded rows (3 and 6 tokens) included
    assert any(len(set(c.prompt_lengths)) > 1 for c in outcome.report.cases)
    config = json.loads((outcome.export.path / "genai_config.json").read_text())["model"]
    assert 0 <= config["pad_token_id"] < 400 and 0 <= config["bos_token_id"] < 400


def test_a_prompt_id_outside_the_vocabulary_is_one_line_error(gpt2_small_vocab):
    from lora_export.runtime.generator import Generator

    with Generator(gpt2_small_vocab[2].export.path) as gen, pytest.raises(UserError, match="outside the model's vocab"):
        gen.prefill([[1, 2, 50256]])

"""verify's generation reference runs every step even when the model's own config names an eos it produces."""

from __future__ import annotations

from lora_export.verify.generation import Reference


def test_reference_ignores_the_models_eos(sample_cache):
    ref = Reference(sample_cache("gpt2"))
    prompt = [11, 23, 5, 64, 8]
    tokens, logits = ref.generate(prompt, 6)
    assert len(tokens) == 6 and logits.shape[0] == 6
    ref.model.generation_config.eos_token_id = tokens[1]  # transformers would stop after two tokens
    again, again_logits = ref.generate(prompt, 6)
    assert again == tokens and again_logits.shape == logits.shape

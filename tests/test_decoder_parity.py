"""Decoder folders generate exactly what PEFT generates (greedy, fp32), for gpt2, llama and qwen2 shapes.

The oracle is PEFT's own `generate` on each prompt alone; our side runs the prompts as one left-padded batch.
"""

from __future__ import annotations

import numpy as np
import pytest
from decoder_setup import ARCHS, PROMPTS, peft_generate, peft_logits

from lora_export.runtime import Generator

NEW = 24


def _alone(pm, prompts, adapters):
    return [peft_generate(pm, p, NEW, a) for p, a in zip(prompts, adapters)]


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_folder_is_token_exact_with_peft(decoders, arch):
    m = decoders.model(arch)
    with Generator(decoders.folder(arch, "merged")) as gen:
        assert gen.layout == "merged"
        one = gen.generate(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True).tokens
        three = gen.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True).tokens
    ref = _alone(m["pm"], PROMPTS, ["x"] * 3)
    assert one == ref[:1]
    assert three == ref
    assert ref != _alone(m["pm"], PROMPTS, [None] * 3)  # the adapter changes the tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_inputs_folder_with_x_y_and_none_is_token_exact_with_peft(decoders, arch):
    m = decoders.model(arch)
    with Generator(decoders.folder(arch, "inputs")) as gen:
        assert sorted(gen.adapters()) == ["x", "y"]  # the folder's adapters/*.onnx_adapter
        got = {
            a: gen.generate(PROMPTS, adapter=a, max_new_tokens=NEW, ignore_eos=True).tokens for a in ["x", "y", None]
        }
        single = gen.generate(PROMPTS[1], adapter="y", max_new_tokens=NEW, ignore_eos=True).tokens
    for a in ("x", "y", None):
        assert got[a] == _alone(m["pm"], PROMPTS, [a] * 3), a
    assert single == got["y"][1:2]
    assert got["x"] != got["y"] != got[None]


@pytest.mark.parametrize("arch", ARCHS)
def test_bank_rows_x_none_y_x_each_generate_as_alone_with_peft(decoders, arch):
    m = decoders.model(arch)
    rows = ["x", None, "y", "x"]
    prompts = PROMPTS + [PROMPTS[1]]
    with Generator(decoders.folder(arch, "bank")) as gen:
        got = gen.generate(prompts, adapters=rows, max_new_tokens=NEW, ignore_eos=True).tokens
    assert got == _alone(m["pm"], prompts, rows)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefill_and_decode_logits_match_peft_and_a_3_token_step_equals_3_steps(decoders, arch):
    m = decoders.model(arch)
    prompt, then = PROMPTS[0], [5, 9, 13]
    ref_prefill, ref_step = peft_logits(m["pm"], "x", prompt, then[:1])
    with Generator(decoders.folder(arch, "inputs")) as gen:
        batch = gen.prefill([prompt], adapter="x")
        np.testing.assert_allclose(batch.logits[0], ref_prefill[-1], atol=1e-4, rtol=0)
        step = gen.step(batch, [then[0]])
        np.testing.assert_allclose(step[0], ref_step[-1], atol=1e-4, rtol=0)
        # three tokens appended at once == three single steps (logits of every position)
        multi = gen.prefill([prompt], adapter="x")
        at_once = gen.step(multi, [then])  # (1, 3, vocab)
        singles = gen.prefill([prompt], adapter="x")
        one_by_one = np.stack([gen.step(singles, [t])[0] for t in then])
    np.testing.assert_allclose(at_once[0], one_by_one, atol=1e-5, rtol=0)
    assert multi.positions.tolist() == singles.positions.tolist() == [len(prompt) + 3]
    assert np.abs(ref_prefill[-1] - peft_logits(m["pm"], None, prompt, then[:1])[0][-1]).max() > 1e-2

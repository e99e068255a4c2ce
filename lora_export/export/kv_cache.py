"""A causal LM with its KV cache as flat tensors: what `export-decoder` traces.

`KvCacheLM` wraps a transformers causal LM so one forward serves prefill (past length 0), single-token decode
and multi-token steps:

    forward(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
            past_key_values.0.key [B, H, P, D], past_key_values.0.value, ...)
        -> logits [B, S, V], present.0.key [B, H, P+S, D], present.0.value, ...

Inside, the flat past tensors become a transformers `DynamicCache` (built from `ddp_cache_data`, one
`DynamicLayer` per layer, as the installed transformers defines them), the model appends this step's keys and
values, and the cache's layers come back out flat. Tensors go in and out, never a `Cache` object, so no pytree
has to be registered for `torch.export`. Position ids are an input: the caller derives them from the mask
(`cumsum(mask) - 1`, transformers' convention for left padding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora_export.artifacts.decoder_folder import DecoderFacts
from lora_export.errors import UserError


def _cache_class():
    from transformers import DynamicCache

    return DynamicCache


def check_causal_lm(module: nn.Module, arch: str, source: str) -> None:
    """One line for anything that is not a transformers causal LM (an encoder, a `py:` factory, a CNN)."""
    can_generate = getattr(module, "can_generate", None)
    if getattr(module, "config", None) is None or not callable(can_generate) or not can_generate():
        kind = f"a {arch} model" if arch not in ("py", "convnet") else f"a {arch} module"
        raise UserError(
            f"{source} is {kind} without a causal LM head: export-decoder is for causal LMs (GPT-2, Llama, Mistral, "
            "Qwen2, ...); use merge-and-export or export-branched for it"
        )


class KvCacheLM(nn.Module):
    """`forward(input_ids, attention_mask, position_ids, *past)` -> `(logits, *present)`, past/present flat
    per layer as (key, value)."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        input_ids, attention_mask, position_ids, *past = args
        if len(past) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past tensors, got {len(past)}")
        cache = _cache_class()(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        return _run(self.model, input_ids, attention_mask, position_ids, cache)


def _run(model, input_ids, attention_mask, position_ids, cache) -> tuple[torch.Tensor, ...]:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        return_dict=True,
    )
    present = out.cache if getattr(out, "cache", None) is not None else cache
    flat = [out.logits]
    for layer in present.layers:
        flat += [layer.keys, layer.values]
    return tuple(flat)


def position_ids_from_mask(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last `new` columns of `mask` [B, T]: `cumsum(mask) - 1`, padded slots at 1 (as
    transformers `generate` does)."""
    pos = mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    return pos[:, -new:]


def probe(module: nn.Module, source: str) -> DecoderFacts:
    """Read the cache shapes from one tiny eager forward (robust to configs that spell heads differently), the
    rest from the config and generation config."""
    config = module.config.get_text_config(decoder=True) if hasattr(module.config, "get_text_config") else module.config
    device = next(module.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    mask = torch.ones(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        flat = _run(module, ids, mask, position_ids_from_mask(mask, 2), _cache_class()())
    logits, present = flat[0], flat[1:]
    if not present or present[0].dim() != 4:
        raise UserError(f"{source}: the model returned no per-layer [batch, heads, seq, head] KV cache to export")
    heads = int(getattr(config, "num_attention_heads", present[0].shape[1]))
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    gen = getattr(module, "generation_config", None)
    eos = _first_set("eos_token_id", gen, config)
    pad = _first_set("pad_token_id", gen, config)
    eos_list = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])] if eos is not None else []
    return DecoderFacts(
        num_layers=len(present) // 2,
        num_key_value_heads=int(present[0].shape[1]),
        head_size=int(present[0].shape[3]),
        num_attention_heads=heads,
        hidden_size=int(getattr(config, "hidden_size", heads * int(present[0].shape[3]))),
        vocab_size=int(logits.shape[-1]),
        context_length=int(context),
        bos_token_id=_as_int(_first_set("bos_token_id", gen, config)),
        eos_token_id=eos_list,
        pad_token_id=_as_int(pad),
    )


def _first_set(name: str, *sources) -> Any:
    for src in sources:
        value = getattr(src, name, None) if src is not None else None
        if value is not None:
            return value
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def example_inputs(facts: DecoderFacts, dtype: torch.dtype, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Trace inputs with every dynamic dim >= 2 and distinct (torch.export specializes 0/1 and may merge equal
    sizes): past length `seq + 1`, total `2 * seq + 1`. The graph still runs past length 0 and one token."""
    from lora_export.contract import decoder_input_names

    g = torch.Generator().manual_seed(seed)
    past = seq + 1
    names = decoder_input_names(facts.num_layers)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    feeds = {
        names[0]: torch.randint(0, facts.vocab_size, (batch, seq), generator=g),
        names[1]: mask,
        names[2]: position_ids_from_mask(mask, seq),
    }
    shape = (batch, facts.num_key_value_heads, past, facts.head_size)
    for name in names[3:]:
        feeds[name] = torch.randn(shape, generator=g).to(dtype)
    return feeds

"""What a transformers model takes and returns, read from the model itself rather than from a table.

Inputs come from the class's `forward` signature and its config:

- text models (`input_ids` in the signature): `input_ids`, then `attention_mask` when the forward takes it,
  `token_type_ids` when it takes them *and* the config has more than one token type (BERT: 2; RoBERTa,
  XLM-R: 1 and DeBERTa-v2: 0 type embeddings, where the ids carry no information). `position_ids` are left to
  the model (0..T-1, what every architecture computes itself); `INPUT_OVERRIDES` can add them;
- vision models (`pixel_values` and no `input_ids`): `pixel_values` `[batch, channels, size, size]` at the
  config's `image_size` (position embeddings are sized for it);
- encoder-decoder models (`config.is_encoder_decoder`: T5, BART, Whisper, ...) are refused in one line.

Outputs come from one probe forward at two small shapes: every tensor the model returns except the loss,
caches, hidden states and attentions (logits for `*ForCausalLM` / `*ForSequenceClassification` /
`*ForTokenClassification` heads, `last_hidden_state` and `pooler_output` for bare encoders); a dimension that
follows the batch is `batch`, one that follows the sequence is `sequence`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from lora_export.errors import UserError
from lora_export.models import inputs as inputs_mod

TEXT, VISION = "text", "vision"
# The inputs we know how to make, in graph order.
TEXT_INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# Per-architecture input names that replace what the signature says (config.model_type -> names).
INPUT_OVERRIDES: dict[str, list[str]] = {}
# Returned values that are not graph outputs.
SKIPPED_OUTPUTS = ("loss", "past_key_values", "hidden_states", "attentions", "cross_attentions", "aux_loss")
# Probe shapes: (batch, seq) pairs whose sizes differ from each other and from common fixed sizes.
PROBES = ((2, 5), (3, 7))


@dataclass
class ModelIO:
    """A transformers model's graph I/O: names, dynamic axes, and how to call it."""

    kind: str  # TEXT or VISION
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    call_kwargs: dict[str, object] = field(default_factory=dict)  # extra keyword arguments for every forward
    image_size: int = 0
    channels: int = 3

    def make_inputs(self, vocab_size: int) -> inputs_mod.InputMaker:
        if self.kind == VISION:
            size, channels = self.image_size, self.channels
            return lambda b, s, seed: inputs_mod.image_inputs(b, size, seed, channels)
        names = list(self.input_names)
        return lambda b, s, seed: inputs_mod.text_inputs(names, vocab_size, b, s, seed)


def forward_parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(type(module).forward)
    return {n: p for n, p in sig.parameters.items() if n != "self"}


def describe(module: nn.Module, spec: str) -> ModelIO:
    """Inputs, outputs and dynamic axes of a transformers `module` (one-line UserError when unsupported)."""
    config = module.config
    arch = getattr(config, "model_type", type(module).__name__)
    cls = type(module).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(
            f"{spec}: {cls} ({arch}) is an encoder-decoder model, which is not supported: lora-export exports "
            "decoder-only and encoder-only transformers models (or wrap a part as py:module:factory)"
        )
    params = forward_parameters(module)
    kind, names = _input_names(config, arch, cls, params, spec)
    required = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in names
    ]
    if required:
        raise UserError(
            f"{spec}: {cls}.forward requires {', '.join(required)}, which lora-export cannot make; "
            "wrap the model as py:module:factory"
        )
    call_kwargs = {k: v for k, v in (("use_cache", False), ("return_dict", True)) if _accepts(params, k)}
    io = ModelIO(kind, names, [], {}, call_kwargs)
    if kind == VISION:
        io.image_size = int(_first_int(config.image_size))
        io.channels = int(getattr(config, "num_channels", 3))
        io.dynamic_axes = {"pixel_values": {0: "batch"}}
    else:
        io.dynamic_axes = {n: {0: "batch", 1: "sequence"} for n in names}
    io.output_names, out_axes = _probe_outputs(module, io, int(getattr(config, "vocab_size", 0) or 2), spec)
    io.dynamic_axes.update(out_axes)
    return io


def _input_names(config, arch: str, cls: str, params: dict, spec: str) -> tuple[str, list[str]]:
    if "input_ids" in params:
        kind = TEXT
    elif "pixel_values" in params:
        kind = VISION
    else:
        raise UserError(
            f"{spec}: {cls}.forward takes neither input_ids nor pixel_values (it takes {', '.join(params)}); "
            "wrap the model as py:module:factory"
        )
    if arch in INPUT_OVERRIDES:
        return kind, list(INPUT_OVERRIDES[arch])
    if kind == VISION:
        return kind, ["pixel_values"]
    names = ["input_ids"]
    if "attention_mask" in params:
        names.append("attention_mask")
    if "token_type_ids" in params and int(getattr(config, "type_vocab_size", 0) or 0) > 1:
        names.append("token_type_ids")
    return kind, names


def _accepts(params: dict[str, inspect.Parameter], name: str) -> bool:
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _first_int(value) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def _probe_outputs(module: nn.Module, io: ModelIO, vocab: int, spec: str) -> tuple[list[str], dict]:
    """Run the model at two shapes; keep its tensor outputs and mark the dims that follow batch / sequence."""
    make = io.make_inputs(vocab)
    shapes: list[dict[str, tuple[int, ...]]] = []
    for batch, seq in PROBES:
        with torch.no_grad():
            try:
                out = module(**make(batch, seq, 0), **io.call_kwargs)
            except Exception as e:  # any model failure here means we cannot drive it
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise UserError(
                    f"{spec}: a forward pass with {', '.join(io.input_names)} failed ({first}); "
                    "wrap the model as py:module:factory"
                ) from None
        items = out.items() if hasattr(out, "items") else []
        shapes.append({k: tuple(v.shape) for k, v in items if isinstance(v, torch.Tensor) and k not in SKIPPED_OUTPUTS})
    names = [n for n in shapes[0] if n in shapes[1] and len(shapes[0][n]) == len(shapes[1][n])]
    if not names:
        raise UserError(f"{spec}: {type(module).__name__} returned no tensor outputs; wrap it as py:module:factory")
    axes: dict[str, dict[int, str]] = {}
    for n in names:
        dims = {}
        for d, (a, b) in enumerate(zip(shapes[0][n], shapes[1][n])):
            if (a, b) == (PROBES[0][0], PROBES[1][0]):
                dims[d] = "batch"
            elif io.kind == TEXT and (a, b) == (PROBES[0][1], PROBES[1][1]):
                dims[d] = "sequence"
        axes[n] = dims
    return names, axes

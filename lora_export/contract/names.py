"""LoRA tensor names: `P.lora_A.weight` / `.bank`, DoRA scales, `modules_to_save` inputs, PEFT keys, and the rule
that splits a graph's inputs into model inputs and LoRA inputs (see the package docstring)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PEFT_PREFIX = "base_model.model."
ADAPTER_INDEX = "adapter_index"
NO_ADAPTER = -1  # adapter_index value that selects no adapter
NUM_ADAPTERS_DIM = "num_adapters"

MERGED, INPUTS, BANK = "merged", "inputs", "bank"
LAYOUTS = (INPUTS, BANK)  # layouts of a branched graph
# How a bank graph computes each row's branch from the same inputs (the feeds do not change):
# dense: the N adapters' A concatenated along r, a per-row rank-slot mask, one matmul with the concatenated B
#        (cost per row grows with N); gather: each row's A and B gathered by `adapter_index`, a batched matmul
#        (cost per row independent of N).
DENSE, GATHER = "dense", "gather"
BANK_FORMULATIONS = (DENSE, GATHER)

A, B = "A", "B"
WEIGHT, BANK_KIND = "weight", "bank"

_NAME_RE = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>A|B)\.(?P<kind>weight|bank)$")


@dataclass(frozen=True)
class LoraName:
    """A parsed contract name: module path, `A`/`B`, and `weight` (inputs layout) or `bank`."""

    path: str
    ab: str
    kind: str = WEIGHT

    def __str__(self) -> str:
        return tensor_name(self.path, self.ab, self.kind)


def tensor_name(path: str, ab: str, kind: str = WEIGHT) -> str:
    if ab not in (A, B) or kind not in (WEIGHT, BANK_KIND):
        raise ValueError(f"no contract name for role {ab!r}/{kind!r}")
    return f"{path}.lora_{ab}.{kind}"


def weight_names(path: str) -> tuple[str, str]:
    """Inputs layout: (`P.lora_A.weight`, `P.lora_B.weight`)."""
    return tensor_name(path, A), tensor_name(path, B)


def bank_names(path: str) -> tuple[str, str]:
    """Bank layout: (`P.lora_A.bank`, `P.lora_B.bank`)."""
    return tensor_name(path, A, BANK_KIND), tensor_name(path, B, BANK_KIND)


def layout_names(path: str, layout: str) -> tuple[str, str]:
    return bank_names(path) if layout == BANK else weight_names(path)


def rank_dim(k: int) -> str:
    """The symbolic rank dimension of the k-th slot of an inputs-layout graph."""
    return f"r_{k}"


_RANK_DIM_RE = re.compile(r"^r_\d+$")


def is_rank_dim(label: str) -> bool:
    """Whether a dim label is a slot's symbolic rank (`rank_dim(k)`)."""
    return _RANK_DIM_RE.match(label) is not None


def strip_peft_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def peft_names(path: str) -> tuple[str, str]:
    """PEFT's adapter file keys for module `path`: (`base_model.model.P.lora_A.weight`, `... .lora_B.weight`)."""
    a, b = weight_names(path)
    return PEFT_PREFIX + a, PEFT_PREFIX + b


# -- DoRA scales and modules_to_save parameters -------------------------------------------------------------

DORA_SCALE, SAVED = "dora_scale", "modules_to_save"
SLOTS_METADATA = "lora_export.slots"  # model metadata key: JSON {path: {"kind", "weight", "layout"}}
LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"  # slot kinds
OUT_IN, IN_OUT = "out_in", "in_out"  # base weight layouts: nn.Linear `[out, in]`; Conv1D, nn.Embedding `[in, out]`
_DORA_RE = re.compile(r"^(?P<path>.+)\.dora_scale\.(?P<kind>weight|bank)$")
_SAVED_RE = re.compile(r"^(?P<module>.+?)\.modules_to_save\.(?P<param>.+?)(?P<bank>\.bank)?$")


def dora_name(path: str, kind: str = WEIGHT) -> str:
    """DoRA's per-output-channel factor of module `path`: `P.dora_scale.weight` `[out]` / `.bank` `[N, out]`."""
    return f"{path}.{DORA_SCALE}.{kind}"


def saved_name(module: str, param: str, kind: str = WEIGHT) -> str:
    """A `modules_to_save` parameter: `M.modules_to_save.p` (inputs layout) or `M.modules_to_save.p.bank`."""
    return f"{module}.{SAVED}.{param}" + (f".{BANK_KIND}" if kind == BANK_KIND else "")


def parse_dora(name: str | None) -> tuple[str, str] | None:
    """`P.dora_scale.weight` -> (P, "weight"); None for anything else."""
    m = _DORA_RE.match(name or "")
    return (strip_peft_prefix(m["path"]), m["kind"]) if m else None


def parse_saved(name: str | None) -> tuple[str, str, str] | None:
    """`M.modules_to_save.p[.bank]` -> (M, p, "weight" | "bank"); None for anything else."""
    m = _SAVED_RE.match(name or "")
    return (strip_peft_prefix(m["module"]), m["param"], BANK_KIND if m["bank"] else WEIGHT) if m else None


# PEFT file keys for embedding LoRA (`P.lora_embedding_A`), DoRA magnitudes (`P.lora_magnitude_vector`) and the
# base layer of a targeted embedding saved with `save_embedding_layers` (`P.base_layer.weight`).
_PEFT_EMBEDDING_RE = re.compile(r"^(?P<path>.+)\.lora_embedding_(?P<ab>A|B)(?:\.[^.]+)?$")
_PEFT_MAGNITUDE_RE = re.compile(r"^(?P<path>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_PEFT_BASE_LAYER_RE = re.compile(r"^(?P<path>.+)\.base_layer\.(?P<param>weight|bias)$")


def parse_peft_embedding_key(key: str) -> LoraName | None:
    m = _PEFT_EMBEDDING_RE.match(key)
    return LoraName(strip_peft_prefix(m["path"]), m["ab"]) if m else None


def parse_peft_magnitude_key(key: str) -> str | None:
    m = _PEFT_MAGNITUDE_RE.match(key)
    return strip_peft_prefix(m["path"]) if m else None


def parse_peft_base_layer_key(key: str) -> tuple[str, str] | None:
    m = _PEFT_BASE_LAYER_RE.match(key)
    return (strip_peft_prefix(m["path"]), m["param"]) if m else None


def peft_embedding_names(path: str) -> tuple[str, str]:
    return f"{PEFT_PREFIX}{path}.lora_embedding_A", f"{PEFT_PREFIX}{path}.lora_embedding_B"


def peft_magnitude_name(path: str) -> str:
    return f"{PEFT_PREFIX}{path}.lora_magnitude_vector"


# PEFT state dicts may carry the adapter's name between the role and `weight` (`P.lora_A.default.weight`)
_PEFT_KEY_RE = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")
PEFT_KEY_HINT = "names ending in .lora_A/.lora_B.weight"  # for error messages about unexpected keys


def parse_peft_key(key: str) -> LoraName | None:
    """A key of a PEFT adapter file (or of a contract-layout file) -> LoraName(P, "A"|"B"); None otherwise."""
    m = _PEFT_KEY_RE.match(key)
    if m is None:
        return None
    return LoraName(strip_peft_prefix(m["path"]), m["ab"])


def parse(name: str | None) -> LoraName | None:
    """`P.lora_A.weight` -> LoraName(P, "A", "weight"); None for anything else (adapter_index included).
    A leading `base_model.model.` is accepted and stripped (adapter files may carry it)."""
    if not name:
        return None
    m = _NAME_RE.match(name)
    if m is None:
        return None
    return LoraName(strip_peft_prefix(m["path"]), m["ab"], m["kind"])


def is_lora_tensor(name: str | None) -> bool:
    """A LoRA A/B tensor (either layout)."""
    return parse(name) is not None


def is_adapter_tensor(name: str | None) -> bool:
    """A tensor an adapter feeds: LoRA A/B, a DoRA scale or a `modules_to_save` parameter (either layout)."""
    return is_lora_tensor(name) or parse_dora(name) is not None or parse_saved(name) is not None


def is_lora_input(name: str | None) -> bool:
    """A graph input that belongs to the LoRA contract: adapter tensors of either layout, or `adapter_index`."""
    return name == ADAPTER_INDEX or is_adapter_tensor(name)


def split_io(items: Iterable[Any], key=lambda item: item["name"]) -> tuple[list[Any], list[Any]]:
    """(model inputs, LoRA tensors) of a list of inputs. `adapter_index` is a model input: it is fed per call
    with a batch dimension, like `input_ids`. The one rule every manifest writer uses."""
    model, lora = [], []
    for item in items:
        (lora if is_adapter_tensor(key(item)) else model).append(item)
    return model, lora

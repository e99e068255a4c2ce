"""The LoRA tensor name contract, in one place.

Every module that builds, recognises or checks a LoRA tensor name, a slot or the graph manifest goes
through here; nothing else spells `.lora_A.weight` or `adapter_index` (a test greps for it). The module sits
at the bottom of the package: it imports only the standard library, numpy and `lora_export.errors`.

Names (for each adapted module at path `P`, as the transformers model names it, no `base_model.model.`):

- `inputs` layout: graph inputs `P.lora_A.weight` `[in, r_k]` and `P.lora_B.weight` `[r_k, out]`, the
  scaling folded into B, each with a same-name rank-0 default initializer (a run without adapter = base);
  `r_k` is one symbolic rank dimension per module.
- `bank` layout: `adapter_index` `[batch]` (int64, `NO_ADAPTER` = -1 = no adapter) and per module
  `P.lora_A.bank` `[num_adapters, in, R]`, `P.lora_B.bank` `[num_adapters, R, out]`.
- embedding modules (LoRA on `nn.Embedding`, PEFT's `lora_embedding_A/B`) use the same two names: A
  `[num_embeddings, r]` is indexed by token id (a gather of A's rows), then multiplied by B `[r, dim]`.
- DoRA (`dora_names(P)`): `P.dora_scale.weight` `[out]` holds `g = m / ||W0 + s·B·A||` (one factor per output
  channel, computed from the adapter and the graph's base weight when it is fed); the branch computes
  `g * (W0·x + s·B·A·x) + bias`. Default ones (= plain LoRA). Bank layout: `P.dora_scale.bank` `[num_adapters,
  out]`. Graphs have these inputs only when exported for DoRA.
- `modules_to_save` (`saved_name(M, p)`): a module the adapter replaces whole (a classification head) takes its
  parameters from inputs `M.modules_to_save.p` (`p` = the parameter's path inside M, e.g. `dense.weight`),
  whose same-name defaults are the base model's values. Bank layout: `M.modules_to_save.p.bank`
  `[num_adapters, *shape]`, the base values kept as the initializer `M.p` for rows without an adapter.
- adapter files (`.onnx_adapter`, `.safetensors`, `.npz`) hold the `inputs`-layout tensors, with or
  without a leading `base_model.model.` on the names.
- graphs with DoRA or embedding slots record per-slot facts the inputs cannot show (layer kind, the base
  weight's initializer name and layout, which DoRA's norm needs) as JSON in the model metadata entry
  `SLOTS_METADATA`.

Decoder folders also follow Optimum / ONNX Runtime GenAI I/O names, kept here for the same reason:
`input_ids`, `attention_mask` (past + new), `position_ids`, `past_key_values.{i}.key|value` in, `logits`,
`present.{i}.key|value` out; manifest kinds `decoder-merged|decoder-inputs|decoder-bank`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from lora_export.errors import AdapterError, UserError, named

# -- names ------------------------------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."
ADAPTER_INDEX = "adapter_index"
NO_ADAPTER = -1  # adapter_index value that selects no adapter
NUM_ADAPTERS_DIM = "num_adapters"

MERGED, INPUTS, BANK = "merged", "inputs", "bank"
LAYOUTS = (INPUTS, BANK)  # layouts of a branched graph

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


# -- decoder I/O (Optimum / ONNX Runtime GenAI) ---------------------------------------------------------------

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


# -- dtypes: one vocabulary ---------------------------------------------------------------------------------------

DTYPES = ("fp32", "fp16", "bf16")
_ONNX_ELEM = {"fp32": 1, "fp16": 10, "bf16": 16}  # onnx.TensorProto.FLOAT / FLOAT16 / BFLOAT16
_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "1": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "10": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "16": "bf16",
}  # fmt: skip


def dtype_name(value: Any) -> str:
    """The name (`fp32` / `fp16` / `bf16`) of a floating type in any spelling: numpy or torch dtypes, ONNX
    element types (int, `FLOAT16`, `tensor(float16)`), onnx-ir `DataType`s, or the names themselves. Unknown
    types raise ValueError."""
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        text = np.dtype(value).name
    elif hasattr(value, "name") and not isinstance(value, str):  # onnx_ir.DataType and friends
        text = value.name
    else:
        text = str(value)
    text = text.lower().removeprefix("torch.").removeprefix("tensor(").removesuffix(")")
    if text not in _ALIASES:
        raise ValueError(f"not a floating-point tensor type we export: {value!r}")
    return _ALIASES[text]


def precision(types: Iterable[Any]) -> str:
    """The precision of a graph from its tensor types: `bf16` / `fp16` when any floating type among `types`
    (any spelling `dtype_name` reads) is reduced precision, else `fp32`; integer and other types are ignored."""
    names = set()
    for t in types:
        try:
            names.add(dtype_name(t))
        except ValueError:
            continue
    return "bf16" if "bf16" in names else "fp16" if "fp16" in names else "fp32"


def numpy_dtype(name: str) -> np.dtype:
    name = dtype_name(name)
    if name == "bf16":
        import ml_dtypes  # onnx's own dependency

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float16 if name == "fp16" else np.float32)


def onnx_elem_type(name: str) -> int:
    return _ONNX_ELEM[dtype_name(name)]


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name(name)]


# -- slots ------------------------------------------------------------------------------------------------------


class ModuleShape(Protocol):
    """What a slot check needs of one adapted module (`adapters.ModuleLora` has it)."""

    @property
    def r(self) -> int: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def is_conv(self) -> bool: ...
    @property
    def is_dora(self) -> bool: ...
    def contract_pair(self) -> tuple[np.ndarray, np.ndarray]: ...
    def dora_scale(self, base_weight: Any, layout: str) -> np.ndarray: ...


class AdapterLike(Protocol):
    name: str
    modules: Mapping[str, ModuleShape]
    saved: Mapping[str, Mapping[str, Any]]  # modules_to_save: module path -> {param path: tensor}


BaseWeights = Callable[[str], np.ndarray]  # a graph's initializer by name (the base weights DoRA and banks need)


@dataclass(frozen=True)
class Slot:
    """One adapted module of a branched graph: where its LoRA tensors go and what shapes they must have."""

    path: str
    in_features: int
    out_features: int
    rank_dim: str | None = None  # inputs layout: the symbolic rank dim of this slot
    dora: bool = False  # the graph takes a DoRA scale for this module
    kind: str = LINEAR  # LINEAR, CONV1D or EMBEDDING (from the graph metadata; LINEAR when unknown)
    weight: str | None = None  # the base weight's initializer name (DoRA's norm reads it)
    layout: str = OUT_IN  # the base weight's layout: OUT_IN (nn.Linear) or IN_OUT (Conv1D, nn.Embedding)

    def to_dict(self) -> dict[str, Any]:
        d = {"path": self.path, "in": self.in_features, "out": self.out_features}
        if self.rank_dim is not None:
            d["rank_dim"] = self.rank_dim
        if self.dora:
            d["dora"] = True
        return d

    def metadata(self) -> dict[str, Any]:
        """What `SLOTS_METADATA` records for this slot."""
        return {"kind": self.kind, "weight": self.weight, "layout": self.layout}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Slot:
        return cls(d["path"], int(d["in"]), int(d["out"]), d.get("rank_dim"), bool(d.get("dora")))

    def problem(
        self,
        module: ModuleShape,
        max_rank: int | None = None,
        *,
        rank_limit: str = "the max rank",
        rank_fix: str = "re-export with a larger --max-rank",
    ) -> str | None:
        """Why `module` does not fit this slot, or None. `rank_limit`/`rank_fix` word the rank problem for the
        caller (a bank graph's max rank, an engine's LoRA rank)."""
        if module.is_conv:
            return f"{self.path} is a Conv2d adapter; branched graphs take Linear/Conv1D adapters (use merged export)"
        if module.in_features != self.in_features or module.out_features != self.out_features:
            return (
                f"{self.path} has in={module.in_features}, out={module.out_features} but the graph slot is "
                f"in={self.in_features}, out={self.out_features}"
            )
        if max_rank is not None and module.r > max_rank:
            return f"{self.path} has rank {module.r}, which exceeds {rank_limit} {max_rank}; {rank_fix}"
        if getattr(module, "is_dora", False) and not self.dora:
            return (
                f"{self.path} is a DoRA module (use_dora) but this graph has no DoRA inputs; "
                "re-export it with --dora (or with this adapter)"
            )
        return None


@dataclass(frozen=True)
class SavedParam:
    """One `modules_to_save` parameter a branched graph takes: module path, parameter path inside it, shape."""

    module: str
    param: str
    shape: tuple[int, ...]

    @property
    def base_name(self) -> str:
        """The base model's parameter (its initializer in bank graphs)."""
        return f"{self.module}.{self.param}"


@dataclass
class SlotTable:
    """The LoRA slots of a graph: its layout, one `Slot` per module, the bank's max rank, the LoRA dtype,
    the `modules_to_save` parameters it takes, and (when read from a file) where its base weights are."""

    layout: str  # INPUTS, BANK, or MERGED (no LoRA inputs)
    slots: dict[str, Slot] = field(default_factory=dict)
    max_rank: int = 0
    dtype: str = "fp32"
    saved: dict[str, SavedParam] = field(default_factory=dict)  # by base_name
    base: BaseWeights | None = field(default=None, repr=False, compare=False)

    @property
    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    @classmethod
    def from_session(cls, session: Any, base: BaseWeights | None = None) -> SlotTable:
        """The slots of an ONNX Runtime session's graph. ORT lists inputs that have a default initializer (the
        LoRA slots) as "overridable initializers", apart from the inputs."""
        values = list(session.get_inputs()) + list(session.get_overridable_initializers())
        meta = session.get_modelmeta().custom_metadata_map.get(SLOTS_METADATA)
        return cls.from_inputs(((v.name, list(v.shape), v.type) for v in values), meta, base)

    @classmethod
    def from_inputs(
        cls, inputs: Iterable[tuple[str, list, Any]], metadata: str | None = None, base: BaseWeights | None = None
    ) -> SlotTable:
        """`inputs`: (name, shape, element type in any spelling `dtype_name` reads) per graph input;
        `metadata`: the graph's `SLOTS_METADATA` JSON, when it has one."""
        import json

        inputs = list(inputs)
        names = {n for n, _, _ in inputs}
        layout = BANK if ADAPTER_INDEX in names else INPUTS
        shapes = {n: s for n, s, _ in inputs}
        meta = json.loads(metadata) if metadata else {}
        slots: dict[str, Slot] = {}
        saved: dict[str, SavedParam] = {}
        max_rank, dtype = 0, "fp32"
        for name, shape, elem in inputs:
            in_saved = parse_saved(name)
            if in_saved is not None and (in_saved[2] == BANK_KIND) == (layout == BANK):
                module, param, kind = in_saved
                dims = shape[1:] if kind == BANK_KIND else shape
                saved[f"{module}.{param}"] = SavedParam(module, param, tuple(int(d) for d in dims))
                continue
            parsed = parse(name)
            if parsed is None or parsed.ab != A or (parsed.kind == BANK_KIND) != (layout == BANK):
                continue
            b_name = tensor_name(parsed.path, B, parsed.kind)
            b_shape = shapes.get(b_name)
            if b_shape is None:
                continue
            dtype = dtype_name(elem)
            m = meta.get(parsed.path, {})
            extra = dict(
                dora=dora_name(parsed.path, parsed.kind) in names,
                kind=m.get("kind", LINEAR),
                weight=m.get("weight"),
                layout=m.get("layout", OUT_IN),
            )
            if layout == BANK:
                slots[parsed.path] = Slot(parsed.path, int(shape[1]), int(b_shape[2]), **extra)
                max_rank = int(shape[2])
            else:
                rank = shape[1] if isinstance(shape[1], str) else None
                slots[parsed.path] = Slot(parsed.path, int(shape[0]), int(b_shape[1]), rank, **extra)
        return cls(layout if slots or saved else MERGED, slots, max_rank, dtype, saved, base)

    def input_names(self) -> list[str]:
        names = [n for p in self.slots for n in layout_names(p, self.layout)]
        kind = BANK_KIND if self.layout == BANK else WEIGHT
        names += [dora_name(p, kind) for p, s in self.slots.items() if s.dora]
        names += [saved_name(s.module, s.param, kind) for s in self.saved.values()]
        return ([ADAPTER_INDEX] if self.layout == BANK else []) + names

    def check_adapter(self, adapter: AdapterLike, *, max_rank: int | None = None, **rank_words: str) -> None:
        """Raise a one-line AdapterError unless every module of `adapter` fits a slot of this graph.

        Bank graphs cap the rank at `self.max_rank`; `max_rank` sets a cap for other tables (an engine built
        with LoRA weights of rank R), and `rank_words` (`rank_limit`, `rank_fix`) word that error."""
        if self.layout == MERGED:
            raise UserError("this graph has no LoRA inputs (a merged or base graph): export it with export-branched")
        unknown = sorted(p for p in adapter.modules if p not in self.slots)
        if unknown:
            have = ", ".join(sorted(self.slots)[:4])
            raise AdapterError(
                f"{named('adapter', adapter.name)}: module(s) "
                f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} "
                f"have no LoRA slot in this graph (slots: {have}{' ...' if len(self.slots) > 4 else ''})"
            )
        if max_rank is None and self.layout == BANK:
            max_rank = self.max_rank
        for p, m in sorted(adapter.modules.items()):
            problem = self.slots[p].problem(m, max_rank, **rank_words)
            if problem:
                raise AdapterError(f"{named('adapter', adapter.name)}: {problem}")
        for module, params in sorted(getattr(adapter, "saved", {}).items()):
            for param, value in sorted(params.items()):
                slot = self.saved.get(f"{module}.{param}")
                if slot is None:
                    have = ", ".join(sorted({s.module for s in self.saved.values()})) or "none"
                    raise AdapterError(
                        f"{named('adapter', adapter.name)}: modules_to_save {module} has no inputs in this graph "
                        f"(graph modules_to_save: {have}); re-export it with this adapter"
                    )
                if tuple(value.shape) != slot.shape:
                    raise AdapterError(
                        f"{named('adapter', adapter.name)}: modules_to_save {module}.{param} is {list(value.shape)} "
                        "but the "
                        f"graph takes {list(slot.shape)}; is it an adapter for this base model?"
                    )

        for path, params in sorted(getattr(adapter, "base_layers", {}).items()):
            self._check_base_layer(adapter, path, params)

    def _check_base_layer(self, adapter: AdapterLike, path: str, params: Mapping[str, Any]) -> None:
        """Base weights saved beside an adapted embedding (`save_embedding_layers`) must be the graph's own."""
        slot = self.slots.get(path)
        for param, value in sorted(params.items()):
            name = slot.weight if slot is not None and param == "weight" else None
            if self.base is None or name is None:
                raise AdapterError(
                    f"{named('adapter', adapter.name)} carries base weights for {path} (save_embedding_layers), "
                    "which can only "
                    "be checked against the graph's: pass the graph (--graph) or load it through LoraSession"
                )
            base = np.asarray(self.base(name))
            if base.shape != tuple(value.shape) or not np.array_equal(_numpy(value).astype(base.dtype), base):
                raise AdapterError(
                    f"{named('adapter', adapter.name)} saves base weights for {path} (save_embedding_layers) that "
                    "differ from "
                    "the graph's; branched graphs swap LoRA tensors, not base weights: use merge-and-export"
                )

    def _dora_scale(self, adapter: AdapterLike, path: str, module: ModuleShape) -> np.ndarray:
        slot = self.slots[path]
        if self.base is None or slot.weight is None:
            raise AdapterError(
                f"{named('adapter', adapter.name)}: {path} is a DoRA module; its scale needs the graph's base weight "
                "(pass the graph: --graph, or load it through LoraSession)"
            )
        return module.dora_scale(self.base(slot.weight), slot.layout)

    def adapter_feeds(self, adapter: AdapterLike) -> dict[str, np.ndarray]:
        """Inputs layout: the adapter's contract tensors (modules it skips keep their defaults)."""
        self.check_adapter(adapter)
        feeds = {}
        for path, mod in sorted(adapter.modules.items()):
            a_name, b_name = weight_names(path)
            a, b = mod.contract_pair()
            feeds[a_name] = np.ascontiguousarray(a.astype(self.np_dtype))
            feeds[b_name] = np.ascontiguousarray(b.astype(self.np_dtype))
            if getattr(mod, "is_dora", False):
                feeds[dora_name(path)] = self._dora_scale(adapter, path, mod).astype(self.np_dtype)
        for module, params in sorted(getattr(adapter, "saved", {}).items()):
            for param, value in sorted(params.items()):
                feeds[saved_name(module, param)] = np.ascontiguousarray(_numpy(value).astype(self.np_dtype))
        return feeds

    def bank_feeds(self, adapters: list[AdapterLike]) -> dict[str, np.ndarray]:
        """Bank layout: stacked `[N, in, R]` / `[N, R, out]` banks, ranks zero-padded to R; bank i = adapters[i].
        DoRA banks hold ones for adapters without DoRA; `modules_to_save` banks the base values for adapters
        that do not replace the module."""
        for a in adapters:
            self.check_adapter(a)
        n, rank = len(adapters), self.max_rank
        feeds = {}
        for path, slot in self.slots.items():
            a_bank = np.zeros((n, slot.in_features, rank), dtype=np.float32)
            b_bank = np.zeros((n, rank, slot.out_features), dtype=np.float32)
            g_bank = np.ones((n, slot.out_features), dtype=np.float32)
            for i, adapter in enumerate(adapters):
                mod = adapter.modules.get(path)
                if mod is None:
                    continue
                a, b = mod.contract_pair()
                a_bank[i, :, : mod.r] = a
                b_bank[i, : mod.r, :] = b
                if getattr(mod, "is_dora", False):
                    g_bank[i] = self._dora_scale(adapter, path, mod)
            a_name, b_name = bank_names(path)
            feeds[a_name] = a_bank.astype(self.np_dtype)
            feeds[b_name] = b_bank.astype(self.np_dtype)
            if slot.dora:
                feeds[dora_name(path, BANK_KIND)] = g_bank.astype(self.np_dtype)
        for sp in self.saved.values():
            rows = [getattr(a, "saved", {}).get(sp.module, {}).get(sp.param) for a in adapters]
            base_value = None
            if any(r is None for r in rows):
                if self.base is None:
                    raise AdapterError(
                        f"modules_to_save {sp.module}: bank rows of adapters without it take the base model's "
                        "values, which need the graph's weights (load the graph through LoraSession)"
                    )
                base_value = _numpy(self.base(sp.base_name))
            bank = np.stack([_numpy(r) if r is not None else base_value for r in rows]) if rows else None
            bank = bank if bank is not None else np.zeros((0, *sp.shape), dtype=np.float32)
            feeds[saved_name(sp.module, sp.param, BANK_KIND)] = bank.astype(self.np_dtype)
        return feeds


def _numpy(value: Any) -> np.ndarray:
    """A float32 array from a numpy array or a (CPU) torch tensor."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def check_bank_index(index: np.ndarray, num_adapters: int, batch: int | None = None) -> None:
    """Raw bank feeds: a 1-D integer array, one entry per row, each NO_ADAPTER or a bank slot (ORT would silently
    zero the branch for an index that matches no slot, or fail inside for a wrong length)."""
    index = np.asarray(index)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise AdapterError(
            f"{ADAPTER_INDEX} must be a 1-D integer array, got {index.dtype} of shape {list(index.shape)}"
        )
    if batch is not None and index.shape[0] != batch:
        raise AdapterError(f"{ADAPTER_INDEX} has {index.shape[0]} entries but the batch has {batch}: one per row")
    bad = [int(i) for i in index if not (i == NO_ADAPTER or 0 <= i < num_adapters)]
    if bad:
        raise AdapterError(
            f"{ADAPTER_INDEX} {bad[:5]} out of range: use {NO_ADAPTER} (no adapter) or 0..{num_adapters - 1}"
        )


# -- the graph manifest (`out.onnx.json`) -------------------------------------------------------------------------

MANIFEST_FORMAT = 1


@dataclass
class GraphManifest:
    """The sidecar written next to every graph: what a later stage (optimize, engines, serving, a Triton config)
    needs without opening the graph. Unknown keys from newer writers are kept in `extra` and written back."""

    kind: str  # base, merged, branched-inputs, branched-bank, decoder-..., unknown
    model: dict[str, Any] = field(default_factory=dict)  # {"source", "arch"}
    adapters: list[dict[str, Any]] = field(default_factory=list)
    opset: int | None = None
    dtype: str = "fp32"
    inputs: list[dict[str, Any]] = field(default_factory=list)  # model inputs (adapter_index included)
    lora_inputs: list[dict[str, Any]] = field(default_factory=list)  # LoRA A/B tensors
    outputs: list[dict[str, Any]] = field(default_factory=list)
    dynamic_axes: dict[str, dict[str, str]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    layout: str | None = None  # INPUTS / BANK for branched graphs
    lora_modules: list[dict[str, Any]] = field(default_factory=list)  # Slot.to_dict()
    max_rank: int | None = None
    no_adapter_index: int | None = None
    optimized: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None  # scheme, block size, quantized nodes/weights (optimize --quantize)
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    def set_io(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        """Record a graph's I/O (value dicts with a "name"), split by the one contract rule."""
        self.inputs, self.lora_inputs = split_io(inputs)
        self.outputs = list(outputs)

    def set_slots(self, table: SlotTable) -> None:
        if table.layout == MERGED:
            self.layout, self.lora_modules, self.max_rank, self.no_adapter_index = None, [], None, None
            return
        self.layout = table.layout
        self.lora_modules = [s.to_dict() for s in table.slots.values()]
        if table.saved:  # modules_to_save parameters the graph takes
            self.extra[SAVED] = [
                {"module": p.module, "param": p.param, "shape": list(p.shape)} for p in table.saved.values()
            ]
        self.max_rank = table.max_rank if table.layout == BANK else None
        self.no_adapter_index = NO_ADAPTER if table.layout == BANK else None

    @property
    def slots(self) -> list[Slot]:
        return [Slot.from_dict(d) for d in self.lora_modules]

    def __getitem__(self, key: str) -> Any:
        """Read access by the JSON key (`manifest["lora_modules"]`), as the sidecar file reads."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d = {k: v for k, v in d.items() if v is not None or k in ("opset",)}
        return {**d, **extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphManifest:
        fmt = data.get("format", MANIFEST_FORMAT)
        if not isinstance(fmt, int) or fmt > MANIFEST_FORMAT:
            raise UserError(f"graph manifest format {fmt!r} is newer than this lora-export understands: upgrade it")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )

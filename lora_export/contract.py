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
- adapter files (`.onnx_adapter`, `.safetensors`, `.npz`) hold the `inputs`-layout tensors, with or
  without a leading `base_model.model.` on the names.

Decoder folders also follow Optimum / ONNX Runtime GenAI I/O names, kept here for the same reason:
`past_key_values.{i}.key|value` in, `present.{i}.key|value` out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from lora_export.errors import AdapterError, UserError

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


def is_lora_input(name: str | None) -> bool:
    """A graph input that belongs to the LoRA contract: A/B tensors of either layout, or `adapter_index`."""
    return name == ADAPTER_INDEX or is_lora_tensor(name)


def split_io(items: Iterable[Any], key=lambda item: item["name"]) -> tuple[list[Any], list[Any]]:
    """(model inputs, LoRA tensors) of a list of inputs. `adapter_index` is a model input: it is fed per call
    with a batch dimension, like `input_ids`. The one rule every manifest writer uses."""
    model, lora = [], []
    for item in items:
        (lora if is_lora_tensor(key(item)) else model).append(item)
    return model, lora


# -- decoder I/O (Optimum / ONNX Runtime GenAI) ---------------------------------------------------------------

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


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
    def contract_pair(self) -> tuple[np.ndarray, np.ndarray]: ...


class AdapterLike(Protocol):
    name: str
    modules: Mapping[str, ModuleShape]


@dataclass(frozen=True)
class Slot:
    """One adapted module of a branched graph: where its LoRA tensors go and what shapes they must have."""

    path: str
    in_features: int
    out_features: int
    rank_dim: str | None = None  # inputs layout: the symbolic rank dim of this slot

    def to_dict(self) -> dict[str, Any]:
        d = {"path": self.path, "in": self.in_features, "out": self.out_features}
        if self.rank_dim is not None:
            d["rank_dim"] = self.rank_dim
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Slot:
        return cls(d["path"], int(d["in"]), int(d["out"]), d.get("rank_dim"))

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
        return None


@dataclass
class SlotTable:
    """The LoRA slots of a graph: its layout, one `Slot` per module, the bank's max rank, the LoRA dtype."""

    layout: str  # INPUTS, BANK, or MERGED (no LoRA inputs)
    slots: dict[str, Slot] = field(default_factory=dict)
    max_rank: int = 0
    dtype: str = "fp32"

    @property
    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    @classmethod
    def from_session(cls, session: Any) -> SlotTable:
        """The slots of an ONNX Runtime session's graph. ORT lists inputs that have a default initializer (the
        LoRA slots) as "overridable initializers", apart from the inputs."""
        values = list(session.get_inputs()) + list(session.get_overridable_initializers())
        return cls.from_inputs((v.name, list(v.shape), v.type) for v in values)

    @classmethod
    def from_inputs(cls, inputs: Iterable[tuple[str, list, Any]]) -> SlotTable:
        """`inputs`: (name, shape, element type in any spelling `dtype_name` reads) per graph input."""
        inputs = list(inputs)
        names = {n for n, _, _ in inputs}
        layout = BANK if ADAPTER_INDEX in names else INPUTS
        shapes = {n: s for n, s, _ in inputs}
        slots: dict[str, Slot] = {}
        max_rank, dtype = 0, "fp32"
        for name, shape, elem in inputs:
            parsed = parse(name)
            if parsed is None or parsed.ab != A or (parsed.kind == BANK_KIND) != (layout == BANK):
                continue
            b_name = tensor_name(parsed.path, B, parsed.kind)
            b_shape = shapes.get(b_name)
            if b_shape is None:
                continue
            dtype = dtype_name(elem)
            if layout == BANK:
                slots[parsed.path] = Slot(parsed.path, int(shape[1]), int(b_shape[2]))
                max_rank = int(shape[2])
            else:
                rank = shape[1] if isinstance(shape[1], str) else None
                slots[parsed.path] = Slot(parsed.path, int(shape[0]), int(b_shape[1]), rank)
        return cls(layout if slots else MERGED, slots, max_rank, dtype)

    def input_names(self) -> list[str]:
        names = [n for p in self.slots for n in layout_names(p, self.layout)]
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
                f"adapter {adapter.name}: module(s) {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} "
                f"have no LoRA slot in this graph (slots: {have}{' ...' if len(self.slots) > 4 else ''})"
            )
        if max_rank is None and self.layout == BANK:
            max_rank = self.max_rank
        for p, m in sorted(adapter.modules.items()):
            problem = self.slots[p].problem(m, max_rank, **rank_words)
            if problem:
                raise AdapterError(f"adapter {adapter.name}: {problem}")

    def adapter_feeds(self, adapter: AdapterLike) -> dict[str, np.ndarray]:
        """Inputs layout: the adapter's contract tensors (modules it skips keep their rank-0 defaults)."""
        self.check_adapter(adapter)
        feeds = {}
        for path, mod in sorted(adapter.modules.items()):
            a_name, b_name = weight_names(path)
            a, b = mod.contract_pair()
            feeds[a_name] = np.ascontiguousarray(a.astype(self.np_dtype))
            feeds[b_name] = np.ascontiguousarray(b.astype(self.np_dtype))
        return feeds

    def bank_feeds(self, adapters: list[AdapterLike]) -> dict[str, np.ndarray]:
        """Bank layout: stacked `[N, in, R]` / `[N, R, out]` banks, ranks zero-padded to R; bank i = adapters[i]."""
        for a in adapters:
            self.check_adapter(a)
        n, rank = len(adapters), self.max_rank
        feeds = {}
        for path, slot in self.slots.items():
            a_bank = np.zeros((n, slot.in_features, rank), dtype=np.float32)
            b_bank = np.zeros((n, rank, slot.out_features), dtype=np.float32)
            for i, adapter in enumerate(adapters):
                mod = adapter.modules.get(path)
                if mod is None:
                    continue
                a, b = mod.contract_pair()
                a_bank[i, :, : mod.r] = a
                b_bank[i, : mod.r, :] = b
            a_name, b_name = bank_names(path)
            feeds[a_name] = a_bank.astype(self.np_dtype)
            feeds[b_name] = b_bank.astype(self.np_dtype)
        return feeds


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

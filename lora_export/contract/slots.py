"""Slots: which adapted modules a branched graph takes, what shapes fit them, and the feeds (inputs layout, banks,
DoRA scales, `modules_to_save`) an adapter becomes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lora_export.contract.dtypes import dtype_name, numpy_dtype
from lora_export.contract.names import (
    ADAPTER_INDEX,
    BANK,
    BANK_KIND,
    INPUTS,
    LINEAR,
    MERGED,
    NO_ADAPTER,
    OUT_IN,
    SLOTS_METADATA,
    WEIGHT,
    A,
    B,
    bank_names,
    dora_name,
    layout_names,
    parse,
    parse_saved,
    saved_name,
    tensor_name,
    weight_names,
)
from lora_export.errors import AdapterError, UserError, named


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
    """What the slot table needs of an adapter (`adapters.Adapter` has it)."""

    name: str
    modules: Mapping[str, ModuleShape]
    saved: Mapping[str, Mapping[str, Any]]  # modules_to_save: module path -> {param path: tensor}
    base_layers: Mapping[str, Mapping[str, Any]]  # base weights saved beside an embedding (save_embedding_layers)


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
        if module.is_dora and not self.dora:
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
        for module, params in sorted(adapter.saved.items()):
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

        for path, params in sorted(adapter.base_layers.items()):
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
            if mod.is_dora:
                feeds[dora_name(path)] = self._dora_scale(adapter, path, mod).astype(self.np_dtype)
        for module, params in sorted(adapter.saved.items()):
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
                if mod.is_dora:
                    g_bank[i] = self._dora_scale(adapter, path, mod)
            a_name, b_name = bank_names(path)
            feeds[a_name] = a_bank.astype(self.np_dtype)
            feeds[b_name] = b_bank.astype(self.np_dtype)
            if slot.dora:
                feeds[dora_name(path, BANK_KIND)] = g_bank.astype(self.np_dtype)
        for sp in self.saved.values():
            rows = [a.saved.get(sp.module, {}).get(sp.param) for a in adapters]
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

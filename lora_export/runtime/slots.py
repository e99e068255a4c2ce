"""What a branched graph expects for LoRA, and turning adapters into feeds for it (numpy, no session).

`GraphSlots` is read from the graph's inputs: per module, its in/out dims, and for a bank graph the
max rank. `adapter_feeds` / `bank_feeds` check an adapter against it with one clear error per problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_export.adapters.adapter import Adapter
from lora_export.errors import AdapterError, UserError

_NP_DTYPES = {"float": np.float32, "float16": np.float16, "FLOAT": np.float32, "FLOAT16": np.float16}


@dataclass
class ModuleSlot:
    path: str
    in_features: int
    out_features: int


@dataclass
class GraphSlots:
    layout: str  # "inputs", "bank" or "merged" (no LoRA inputs)
    modules: dict[str, ModuleSlot] = field(default_factory=dict)
    max_rank: int = 0
    dtype: type = np.float32

    @property
    def dtype_name(self) -> str:
        """ "fp16" or "fp32": the LoRA inputs' precision, as pack-adapter and the CLI name it."""
        return "fp16" if self.dtype == np.float16 else "fp32"

    @classmethod
    def from_inputs(cls, inputs: list[tuple[str, list, str]]) -> GraphSlots:
        """`inputs`: (name, shape, onnx element type name) for each graph input."""
        names = {n for n, _, _ in inputs}
        layout = "bank" if "adapter_index" in names else "inputs"
        modules: dict[str, ModuleSlot] = {}
        max_rank, dtype = 0, np.float32
        suffix_a = ".lora_A.bank" if layout == "bank" else ".lora_A.weight"
        suffix_b = ".lora_B.bank" if layout == "bank" else ".lora_B.weight"
        shapes = {n: s for n, s, _ in inputs}
        for name, shape, elem in inputs:
            if not name.endswith(suffix_a):
                continue
            path = name[: -len(suffix_a)]
            b_shape = shapes.get(path + suffix_b)
            if b_shape is None:
                continue
            dtype = _NP_DTYPES.get(elem, np.float32)
            if layout == "bank":
                modules[path] = ModuleSlot(path, int(shape[1]), int(b_shape[2]))
                max_rank = int(shape[2])
            else:
                modules[path] = ModuleSlot(path, int(shape[0]), int(b_shape[1]))
        if not modules:
            layout = "merged"
        return cls(layout, modules, max_rank, dtype)

    @classmethod
    def from_session(cls, session) -> GraphSlots:
        def elem(t: str) -> str:  # "tensor(float16)" -> "float16"
            return t[t.find("(") + 1 : -1]

        # ORT lists inputs that have a default initializer as "overridable initializers", not inputs
        values = list(session.get_inputs()) + list(session.get_overridable_initializers())
        return cls.from_inputs([(i.name, list(i.shape), elem(i.type)) for i in values])

    @classmethod
    def from_onnx(cls, path: str | Path) -> GraphSlots:
        import onnx

        from lora_export.inspect import load_onnx_header

        model = load_onnx_header(path)
        inputs = []
        for i in model.graph.input:
            t = i.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            inputs.append((i.name, shape, onnx.TensorProto.DataType.Name(t.elem_type)))
        return cls.from_inputs(inputs)

    def check_adapter(self, adapter: Adapter) -> None:
        if self.layout == "merged":
            raise UserError("this graph has no LoRA inputs (a merged or base graph): export it with export-branched")
        unknown = sorted(p for p in adapter.modules if p not in self.modules)
        if unknown:
            have = ", ".join(sorted(self.modules)[:4])
            raise AdapterError(
                f"adapter {adapter.name}: module(s) {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} "
                f"have no LoRA slot in this graph (slots: {have}{' ...' if len(self.modules) > 4 else ''})"
            )
        for p, m in sorted(adapter.modules.items()):
            slot = self.modules[p]
            if m.is_conv or m.in_features != slot.in_features or m.out_features != slot.out_features:
                raise AdapterError(
                    f"adapter {adapter.name}: {p} has A {tuple(m.A.shape)}, B {tuple(m.B.shape)} (in={m.in_features}, "
                    f"out={m.out_features}) but the graph slot is in={slot.in_features}, out={slot.out_features}"
                )
            if self.layout == "bank" and m.r > self.max_rank:
                raise AdapterError(
                    f"adapter {adapter.name}: {p} has rank {m.r}, above this bank graph's max rank {self.max_rank}; "
                    "re-export with a larger --max-rank"
                )


def adapter_feeds(adapter: Adapter, slots: GraphSlots) -> dict[str, np.ndarray]:
    """Contract tensors for an `inputs`-layout graph (modules the adapter skips keep their rank-0 default)."""
    slots.check_adapter(adapter)
    return {k: np.ascontiguousarray(v.astype(slots.dtype)) for k, v in adapter.contract_tensors().items()}


def bank_feeds(adapters: list[Adapter], slots: GraphSlots) -> dict[str, np.ndarray]:
    """Stacked `[N, in, R]` / `[N, R, out]` banks, ranks zero-padded to R; bank i holds `adapters[i]`."""
    for a in adapters:
        slots.check_adapter(a)
    n, rank = len(adapters), slots.max_rank
    feeds = {}
    for path, slot in slots.modules.items():
        a_bank = np.zeros((n, slot.in_features, rank), dtype=np.float32)
        b_bank = np.zeros((n, rank, slot.out_features), dtype=np.float32)
        for i, adapter in enumerate(adapters):
            mod = adapter.modules.get(path)
            if mod is None:
                continue
            a, b = mod.contract_pair()
            a_bank[i, :, : mod.r] = a
            b_bank[i, : mod.r, :] = b
        feeds[f"{path}.lora_A.bank"] = a_bank.astype(slots.dtype)
        feeds[f"{path}.lora_B.bank"] = b_bank.astype(slots.dtype)
    return feeds

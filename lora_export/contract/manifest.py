"""The graph manifest schema (`out.onnx.json`): what a later stage needs without opening the graph."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lora_export.contract.names import BANK, MERGED, NO_ADAPTER, SAVED, split_io
from lora_export.contract.slots import Slot, SlotTable
from lora_export.errors import UserError

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

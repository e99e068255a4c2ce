"""`LoraSession`: open a branched graph once, keep many adapters resident, pick one per call or one per row.

- `inputs` graphs: each resident adapter is packed once into an ONNX Runtime `LoraAdapter` (memory-mapped
  `.onnx_adapter` in a session-owned temp dir) and activated per call with `RunOptions.add_active_adapter`;
  if ORT refuses that, its tensors are kept as prepared `OrtValue` feeds instead.
- `bank` graphs: a call names an adapter per row; the banks for that set of adapters are stacked once and
  cached, the call only builds the per-row adapter index.

Switching adapters never rebuilds the session. `run` takes no lock around inference (ORT sessions are safe
to call from many threads); the resident tables are replaced copy-on-write under a lock.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.pack import write_packed
from lora_export.adapters.peft_io import read_adapter
from lora_export.backends.onnxrt import feedable_names, open_session
from lora_export.contract import (
    ADAPTER_INDEX,
    BANK,
    INPUTS,
    MERGED,
    NO_ADAPTER,
    SlotTable,
    check_bank_index,
    is_lora_input,
)
from lora_export.errors import UserError
from lora_export.onnxio import InitializerReader

_BANK_CACHE = 16


@dataclass
class _Resident:
    adapter: Adapter
    generation: int  # unique per load: bank caches are keyed on it, so a reloaded name never hits stale banks
    ort_adapter: Any = None  # onnxruntime.LoraAdapter, inputs layout
    feeds: dict[str, Any] | None = None  # OrtValues, the fallback when LoraAdapter is not usable
    file: Path | None = None  # the packed .onnx_adapter behind `ort_adapter`


class LoraSession:
    def __init__(
        self,
        graph: str | Path,
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
        use_ort_adapters: bool = True,
    ):
        self.path = Path(graph)
        self.session = open_session(self.path, providers, threads)
        self.slots = SlotTable.from_session(self.session, InitializerReader(self.path))
        if self.slots.layout == MERGED:
            raise UserError(f"{self.path} has no LoRA inputs: open a graph made by export-branched")
        self.input_names = set(feedable_names(self.session))
        self.model_inputs = {i.name for i in self.session.get_inputs()} - {ADAPTER_INDEX}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._resident: dict[str, _Resident] = {}
        self._lock = threading.Lock()
        self._bank_cache: OrderedDict[tuple[tuple[str, int], ...], dict[str, Any]] = OrderedDict()
        self._generations = itertools.count()
        self._use_ort_adapters = use_ort_adapters
        self._tmp = tempfile.TemporaryDirectory(prefix="lora_session_")

    @property
    def layout(self) -> str:
        return self.slots.layout

    # -- adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str | Path | Adapter, *, allow_nonfinite: bool = False) -> Adapter:
        """Make an adapter resident as `name`: a PEFT dir, an .onnx_adapter/.safetensors/.npz file, or an Adapter."""
        adapter = (
            source if isinstance(source, Adapter) else read_adapter(source, name=name, allow_nonfinite=allow_nonfinite)
        )
        self.slots.check_adapter(adapter)
        resident = _Resident(adapter, next(self._generations))
        if self.layout == INPUTS:
            self._prepare_inputs(resident)
        with self._lock:
            previous = self._resident.get(name)
            self._resident = {**self._resident, name: resident}
            self._drop_cached(name)
        _release(previous)
        return adapter

    def _prepare_inputs(self, resident: _Resident) -> None:
        import onnxruntime as ort

        tensors = self.slots.adapter_feeds(resident.adapter)  # A/B, DoRA scales, modules_to_save, in the graph dtype
        if self._use_ort_adapters:
            try:
                path = Path(self._tmp.name) / f"{resident.generation}.onnx_adapter"
                write_packed(tensors, path)
                lora = ort.LoraAdapter()
                lora.Load(str(path))
                resident.ort_adapter, resident.file = lora, path
                return
            except Exception:  # older ORT or an unsupported device: fall back to prepared feeds
                resident.ort_adapter = None
        resident.feeds = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()}

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._resident:
                raise UserError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self._resident) or 'none'})")
            previous = self._resident[name]
            self._resident = {k: v for k, v in self._resident.items() if k != name}
            self._drop_cached(name)
        _release(previous)

    def _drop_cached(self, name: str) -> None:
        """Under the lock: forget bank stacks that hold `name` (they are keyed by (name, generation))."""
        self._bank_cache = OrderedDict((k, v) for k, v in self._bank_cache.items() if all(n != name for n, _ in k))

    def adapters(self) -> list[str]:
        return list(self._resident)

    def __contains__(self, name: str) -> bool:
        return name in self._resident

    # -- inference ------------------------------------------------------------------------------------------
    def run(
        self,
        feeds: dict[str, np.ndarray],
        *,
        adapter: str | None = None,
        adapters: list[str | None] | None = None,
        output_names: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run with one adapter for the whole batch (`adapter`), or one per row (`adapters`, bank graphs)."""
        import onnxruntime as ort

        outputs = output_names or self.output_names
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        resident = self._resident  # a snapshot: load/unload replace the dict, never mutate it
        run_options = None
        batch = self._batch(feeds)
        if adapters is not None and len(adapters) != batch:
            raise UserError(f"adapters names {len(adapters)} row(s) but the batch has {batch}: give one name per row")
        if self.layout == BANK and ADAPTER_INDEX in feeds and adapters is None and adapter is None:
            # raw indices into the resident adapters, in load order
            names = tuple(resident)
            index = feeds.pop(ADAPTER_INDEX)
            check_bank_index(index, len(names), batch)
            rows = [names[i] if i >= 0 else None for i in np.asarray(index).tolist()]
            feeds.update(self._bank_feeds(rows, resident))
        elif self.layout == BANK:
            rows = adapters if adapters is not None else [adapter] * batch
            feeds.update(self._bank_feeds(rows, resident))
        else:
            if adapters is not None:
                names = set(adapters)
                if len(names) > 1:
                    raise UserError("per-row adapters need a bank graph (export-branched --layout bank)")
                adapter = next(iter(names))
            if adapter is not None:
                res = self._get(adapter, resident)
                if res.ort_adapter is not None:
                    run_options = ort.RunOptions()
                    run_options.add_active_adapter(res.ort_adapter)
                else:
                    feeds.update(res.feeds)
        values = self.session.run(outputs, feeds, run_options)
        return dict(zip(outputs, values))

    def _batch(self, feeds: dict[str, Any]) -> int:
        """The batch size, from the model inputs (LoRA tensors have no batch dimension)."""
        for k, v in feeds.items():
            if not is_lora_input(k) and np.ndim(v) >= 1:
                return int(np.shape(v)[0])
        raise UserError(f"no model inputs given: feed {', '.join(sorted(self.model_inputs)) or 'the graph inputs'}")

    def _get(self, name: str, resident: dict[str, _Resident]) -> _Resident:
        try:
            return resident[name]
        except KeyError:
            raise UserError(
                f"no adapter named {name!r} is loaded (loaded: {', '.join(resident) or 'none'}): load_adapter it first"
            ) from None

    def _bank_feeds(self, rows: list[str | None], resident: dict[str, _Resident]) -> dict[str, Any]:
        names = tuple(sorted({r for r in rows if r is not None}))
        key = tuple((n, self._get(n, resident).generation) for n in names)
        with self._lock:
            cached = self._bank_cache.get(key)
            if cached is not None:
                self._bank_cache.move_to_end(key)
        if cached is None:
            cached = bank_feeds([resident[n].adapter for n in names], self.slots)
            with self._lock:
                self._bank_cache[key] = cached
                while len(self._bank_cache) > _BANK_CACHE:
                    self._bank_cache.popitem(last=False)
        position = {n: i for i, n in enumerate(names)}
        index = np.array([position[r] if r is not None else NO_ADAPTER for r in rows], dtype=np.int64)
        return {**cached, ADAPTER_INDEX: index}

    def close(self) -> None:
        self.session = None
        self._resident = {}
        self._tmp.cleanup()

    def __enter__(self) -> LoraSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _release(resident: _Resident | None) -> None:
    """Drop a replaced/unloaded adapter's packed file (runs still holding its LoraAdapter keep the mapping)."""
    if resident is not None and resident.file is not None:
        resident.file.unlink(missing_ok=True)


def bank_feeds(adapters: list[Adapter], slots: SlotTable) -> dict[str, np.ndarray]:
    """The stacked banks for `adapters` (a module-level seam: tests wrap it to race a reload against it)."""
    return slots.bank_feeds(adapters)

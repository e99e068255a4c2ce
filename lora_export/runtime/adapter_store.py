"""`AdapterStore`: the adapters resident for one graph, by name; what `LoraSession` and `Generator` share.

- `inputs` graphs: each adapter is packed once into an ONNX Runtime `LoraAdapter` (memory-mapped
  `.onnx_adapter` in a store-owned temp dir), applied per call through `RunOptions.add_active_adapter`;
  if ORT refuses that, its tensors are kept as prepared `OrtValue` feeds instead (`activation`).
- `bank` graphs: a call names an adapter per row; the banks for that set of adapters are stacked once and
  cached (LRU), a call only builds the per-row adapter index (`bank_feeds`).

Thread-safe: the resident table is replaced copy-on-write under a lock, so readers take a snapshot and never
lock around inference; a name reloaded gets a new generation, so cached banks never serve stale tensors.
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
from lora_export.contract import ADAPTER_INDEX, INPUTS, NO_ADAPTER, SlotTable
from lora_export.errors import UserError
from lora_export.models.sources import open_adapter

BANK_CACHE = 16  # stacked banks kept per set of adapters, least recently used dropped first ...
BANK_CACHE_BYTES = 32 << 20  # ... and at most this many bytes of them: with many adapters sets rarely recur, and a
# set of 32 rank-16 adapters on GPT-2 small's c_attn is 75 MB (uncapped, 16 of them took the RSS 0.8 GB higher)


@dataclass
class Resident:
    adapter: Adapter
    generation: int  # unique per load: bank caches are keyed on it
    ort_adapter: Any = None  # onnxruntime.LoraAdapter, inputs layout
    feeds: dict[str, Any] | None = None  # OrtValues, the fallback when LoraAdapter is not usable
    file: Path | None = None  # the packed .onnx_adapter behind `ort_adapter`


class AdapterStore:
    def __init__(self, slots: SlotTable, *, use_ort_adapters: bool = True):
        self.slots = slots
        self._resident: dict[str, Resident] = {}
        self._lock = threading.Lock()
        self._bank_cache: OrderedDict[tuple[tuple[str, int], ...], dict[str, Any]] = OrderedDict()
        self._generations = itertools.count()
        self._use_ort_adapters = use_ort_adapters
        self._tmp: tempfile.TemporaryDirectory | None = None  # made on the first packed adapter (inputs layout)

    @property
    def layout(self) -> str:
        return self.slots.layout

    @property
    def folder(self) -> str:
        """Where packed `.onnx_adapter` files of resident adapters live (one per inputs-layout adapter)."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lora_adapters_")
        return self._tmp.name

    def load(self, name: str, source: str | Path | Adapter, *, allow_nonfinite: bool = False) -> Adapter:
        """Make an adapter resident as `name`: a PEFT dir, an .onnx_adapter/.safetensors/.npz file, or an Adapter."""
        check_adapter_name(name)
        adapter = open_adapter(source, name=name, allow_nonfinite=allow_nonfinite)
        self.slots.check_adapter(adapter)
        resident = Resident(adapter, next(self._generations))
        if self.layout == INPUTS:
            self._prepare_inputs(resident)
        with self._lock:
            previous = self._resident.get(name)
            self._resident = {**self._resident, name: resident}
            self._drop_cached(name)
        _release(previous)
        return adapter

    def _prepare_inputs(self, resident: Resident) -> None:
        import onnxruntime as ort

        tensors = self.slots.adapter_feeds(resident.adapter)  # A/B, DoRA scales, modules_to_save, graph dtype
        if self._use_ort_adapters:
            try:
                path = Path(self.folder) / f"{resident.generation}.onnx_adapter"
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

    def names(self) -> list[str]:
        return list(self._resident)

    def __contains__(self, name: str) -> bool:
        return name in self._resident

    def snapshot(self) -> dict[str, Resident]:
        """The resident table as of now (load/unload replace the dict, never mutate it)."""
        return self._resident

    def get(self, name: str, resident: dict[str, Resident] | None = None) -> Resident:
        resident = self._resident if resident is None else resident
        try:
            return resident[name]
        except KeyError:
            raise UserError(
                f"no adapter named {name!r} is loaded (loaded: {', '.join(resident) or 'none'}): load_adapter it first"
            ) from None

    def activation(self, name: str | None, resident: dict[str, Resident] | None = None) -> tuple[Any, dict[str, Any]]:
        """Inputs layout: (RunOptions with the adapter active, or None; extra OrtValue feeds) for one adapter."""
        if name is None:
            return None, {}
        res = self.get(name, resident)
        if res.ort_adapter is not None:
            import onnxruntime as ort

            run_options = ort.RunOptions()
            run_options.add_active_adapter(res.ort_adapter)
            return run_options, {}
        return None, dict(res.feeds)

    def bank_feeds(self, rows: list[str | None], resident: dict[str, Resident] | None = None) -> dict[str, Any]:
        """Bank layout: the stacked banks of the rows' adapters (cached per set) and the per-row adapter index."""
        resident = self._resident if resident is None else resident
        names = tuple(sorted({r for r in rows if r is not None}))
        key = tuple((n, self.get(n, resident).generation) for n in names)
        with self._lock:
            cached = self._bank_cache.get(key)
            if cached is not None:
                self._bank_cache.move_to_end(key)
        if cached is None:
            cached = bank_feeds([resident[n].adapter for n in names], self.slots)
            with self._lock:  # a set over the budget on its own is used, not kept
                cache = self._bank_cache
                if _nbytes(cached) <= BANK_CACHE_BYTES:
                    cache[key] = cached
                while len(cache) > BANK_CACHE or sum(map(_nbytes, cache.values())) > BANK_CACHE_BYTES:
                    cache.popitem(last=False)
        position = {n: i for i, n in enumerate(names)}
        index = np.array([position[r] if r is not None else NO_ADAPTER for r in rows], dtype=np.int64)
        return {**cached, ADAPTER_INDEX: index}

    def close(self) -> None:
        with self._lock:
            self._resident = {}
            self._bank_cache = OrderedDict()
        if self._tmp is not None:
            self._tmp.cleanup()


def check_adapter_name(name: object) -> str:
    """Adapter names are non-empty strings (None means "no adapter" in a run, so it cannot name one)."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"adapter name {name!r}: give a non-empty string (None means no adapter in run)")
    return name


def _nbytes(feeds: dict[str, Any]) -> int:
    return sum(getattr(v, "nbytes", 0) for v in feeds.values())


def _release(resident: Resident | None) -> None:
    """Drop a replaced/unloaded adapter's packed file (runs still holding its LoraAdapter keep the mapping)."""
    if resident is not None and resident.file is not None:
        resident.file.unlink(missing_ok=True)


def bank_feeds(adapters: list[Adapter], slots: SlotTable) -> dict[str, np.ndarray]:
    """The stacked banks for `adapters` (a module-level seam: tests wrap it to race a reload against it)."""
    return slots.bank_feeds(adapters)

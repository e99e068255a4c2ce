"""`LoraSession`: open a branched graph once, keep many adapters resident, pick one per call or one per row.

- `inputs` graphs: each resident adapter is packed once into an ONNX Runtime `LoraAdapter` (memory-mapped
  `.onnx_adapter` in a temp dir) and activated per call with `RunOptions.add_active_adapter`;
  if ORT refuses that, its tensors are kept as prepared `OrtValue` feeds instead.
- `bank` graphs: a call names an adapter per row; the banks for that set of adapters are stacked once and
  cached, the call only builds the per-row adapter index.

The resident adapters live in an `AdapterStore` (`runtime.adapters`, shared with the decoder `Generator`).
Switching adapters never rebuilds the session. `run` takes no lock around inference (ORT sessions are safe
to call from many threads); the resident table is replaced copy-on-write under a lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lora_export.adapters.adapter import Adapter
from lora_export.artifacts.onnxio import InitializerReader
from lora_export.backends.onnxrt import feedable_names, open_session
from lora_export.contract import ADAPTER_INDEX, BANK, MERGED, SlotTable, check_bank_index, is_lora_input
from lora_export.errors import UserError
from lora_export.runtime.adapter_store import AdapterStore


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
        self.store = AdapterStore(self.slots, use_ort_adapters=use_ort_adapters)

    @property
    def layout(self) -> str:
        return self.slots.layout

    # -- adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str | Path | Adapter, *, allow_nonfinite: bool = False) -> Adapter:
        """Make an adapter resident as `name`: a PEFT dir, an .onnx_adapter/.safetensors/.npz file, or an Adapter."""
        self._check_open()
        return self.store.load(name, source, allow_nonfinite=allow_nonfinite)

    def unload(self, name: str) -> None:
        self._check_open()
        self.store.unload(name)

    def adapters(self) -> list[str]:
        return self.store.names()

    def __contains__(self, name: str) -> bool:
        return name in self.store

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
        self._check_open()
        outputs = output_names or self.output_names
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        resident = self.store.snapshot()  # load/unload replace the table, never mutate it
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
            feeds.update(self.store.bank_feeds(rows, resident))
        elif self.layout == BANK:
            rows = adapters if adapters is not None else [adapter] * batch
            feeds.update(self.store.bank_feeds(rows, resident))
        else:
            if adapters is not None:
                names = set(adapters)
                if len(names) > 1:
                    raise UserError("per-row adapters need a bank graph (export-branched --layout bank)")
                adapter = next(iter(names))
            run_options, extra = self.store.activation(adapter, resident)
            feeds.update(extra)
        values = self.session.run(outputs, feeds, run_options)
        return dict(zip(outputs, values))

    def _batch(self, feeds: dict[str, Any]) -> int:
        """The batch size, from the model inputs (LoRA tensors have no batch dimension)."""
        for k, v in feeds.items():
            if not is_lora_input(k) and np.ndim(v) >= 1:
                return int(np.shape(v)[0])
        raise UserError(f"no model inputs given: feed {', '.join(sorted(self.model_inputs)) or 'the graph inputs'}")

    def _check_open(self) -> None:
        if self.session is None:
            raise UserError(
                f"this LoraSession on {self.path} is closed: open a new LoraSession to run or load adapters"
            )

    def close(self) -> None:
        self.session = None
        self.store.close()

    def __enter__(self) -> LoraSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

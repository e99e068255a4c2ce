"""The decoder as the scheduler drives it: `runtime.Generator`'s batch-level API behind `ServedModel`.

    prefill(prompts, adapters) -> (Batch, logits)   Generator.prefill (rows left-padded together, empty cache)
    extend(batch, new)                               Generator.join    (at a step boundary, KV left-padded)
    step(batch, tokens) -> (batch, logits)           Generator.step    (one token per row, one graph run)
    keep(batch, rows)                                Generator.drop of every other row

Adapters are loaded by the engine under `name@version` keys from their paths (PEFT dirs or `.onnx_adapter`
files); the folder's own `adapters/NAME.onnx_adapter` files are served under NAME by default (see `folder_adapters`).

`step_delay_ms` paces every decode step (a drill knob, `serve --debug-step-delay-ms`): a generation of n tokens
then takes at least n times that long on any machine, so disconnect and fault tests do not depend on its speed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_export.artifacts.decoder_folder import read_folder


class GeneratorModel:
    def __init__(self, generator, *, step_delay_ms: float = 0.0):
        self.generator = generator
        self.step_delay = max(0.0, step_delay_ms) / 1000.0
        facts = generator.facts
        self.layout = generator.layout
        self.context_length = int(facts.context_length)
        self.vocab_size = int(facts.vocab_size)
        self.eos_token_ids = tuple(int(e) for e in facts.eos_token_id)

    def prefill(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None]) -> tuple[Any, np.ndarray]:
        batch = self.generator.prefill([list(p) for p in prompts], adapters=list(adapters))
        return batch, batch.logits

    def extend(self, state: Any, new: Any) -> Any:
        return self.generator.join(state, new)

    def step(self, state: Any, tokens: Sequence[int]) -> tuple[Any, np.ndarray]:
        self.generator.step(state, np.asarray(tokens, dtype=np.int64))
        if self.step_delay:
            time.sleep(self.step_delay)
        return state, state.logits

    def keep(self, state: Any, rows: Sequence[int]) -> Any:
        kept = set(rows)
        return self.generator.drop(state, [i for i in range(state.rows) if i not in kept])

    def load_adapter(self, name: str, path: str) -> None:
        self.generator.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.generator.unload(name)


def open_served_model(
    folder: str | Path, *, threads: int | None = None, step_delay_ms: float = 0.0
) -> tuple[GeneratorModel, Any]:
    """The folder's decoder (adapters loaded on demand by the engine) and its tokenizer (None without one).
    ONNX Runtime's intra-op threads do not spin between runs: a replica shares its cores with the Serve proxy,
    the ingress and its own event loop, which a spinning pool would starve."""
    from lora_export.runtime.generator import Generator

    generator = Generator(folder, threads=threads, spinning=False, load_folder_adapters=False)
    tokenizer = generator.tokenizer if generator.folder.has_tokenizer else None
    return GeneratorModel(generator, step_delay_ms=step_delay_ms), tokenizer


def folder_adapters(folder: str | Path) -> dict[str, str]:
    """NAME -> path of the adapters packed into the folder by export-decoder (`adapters/NAME.onnx_adapter`)."""
    return {name: str(path) for name, path in read_folder(folder).adapter_files.items()}

"""The decoder folder the server tests serve, and the offline generator's tokens they must equal.

`sample:gpt2` exported with `export-decoder --layout bank` and four random PEFT adapters (non-zero B) packed
into the folder; a fifth adapter (a PEFT directory) for loading at run time; a byte-level tokenizer with a
chat template written into the folder. The adapters are strong (scale 64) so that every adapter's tokens
differ from the base model's and from each other's: a mix-up cannot go unnoticed. The reference is
`runtime.Generator` on the same folder, each request generated alone with its own adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from serve_helpers import write_tokenizer

ARCH = "sample:gpt2"


@dataclass
class DecoderFixture:
    folder: Path
    base_name: str
    adapters: dict[str, Path]  # name -> PEFT adapter dir (the first four are also in the folder)
    prompts: list[list[int]]
    context_length: int
    eos: tuple[int, ...]
    generator: Any
    _cache: dict = field(default_factory=dict)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def greedy(self, prompt: list[int], adapter: str | None, n: int, ignore_eos: bool = False) -> list[int]:
        """The offline generator's greedy tokens for this prompt alone, with this adapter."""
        key = (tuple(prompt), adapter, n, ignore_eos)
        if key not in self._cache:
            result = self.generator.generate(
                [list(prompt)], adapter=adapter, max_new_tokens=n, temperature=0.0, ignore_eos=ignore_eos
            )
            self._cache[key] = list(result.tokens[0])
        return self._cache[key]

    def decode(self, ids: list[int]) -> str:
        return self.generator.decode(ids)

    def encode(self, text: str) -> list[int]:
        return self.generator.encode(text)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        ids = self.generator.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]


def make_decoder(root: Path, adapters: int = 5, layout: str = "bank") -> DecoderFixture:
    from lora_export import api
    from lora_export.adapters.peft_io import read_adapter
    from lora_export.export.decoder import export_decoder
    from lora_export.models import load_model
    from lora_export.runtime.generator import Generator

    loaded = load_model(ARCH)
    dirs = {f"ad{i}": root / f"ad{i}" for i in range(adapters)}
    for i, path in enumerate(dirs.values()):
        r = 4 + 4 * (i % 2)  # scale alpha / r = 64: on this random tiny model, every adapter changes every token
        api.make_adapter(loaded, path, r=r, alpha=64.0 * r, seed=10 + i)
    folder = root / "decoder"
    packed = [read_adapter(p) for p in list(dirs.values())[:4]]
    export_decoder(loaded, folder, adapters=packed, layout=layout, max_rank=8)
    generator = Generator(folder, threads=1)
    write_tokenizer(folder, generator.facts.vocab_size)
    for name in list(dirs)[4:]:
        generator.load_adapter(name, dirs[name])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, generator.facts.vocab_size, size=int(rng.integers(3, 14))).tolist() for _ in range(12)]
    facts = generator.facts
    return DecoderFixture(
        folder, folder.name, dirs, prompts, facts.context_length, tuple(facts.eos_token_id), generator
    )

"""What `export-decoder` returns (traced or fused), and the files a folder of it holds (so `--force` may replace
them): its own module, so the traced (`export.decoder`) and fused (`export.fused`) writers share it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_export.artifacts.decoder_folder import (
    ADAPTERS_DIR,
    CONFIG_NAME,
    MODEL_NAME,
    TOKENIZER_FILES,
    DecoderFacts,
)
from lora_export.contract import GraphManifest

WRITTEN = (MODEL_NAME, f"{MODEL_NAME}.data", f"{MODEL_NAME}.json", CONFIG_NAME, ADAPTERS_DIR, *TOKENIZER_FILES)


@dataclass
class DecoderExport:
    path: Path  # the folder
    manifest: GraphManifest
    facts: DecoderFacts
    adapters: dict[str, Path]  # NAME -> adapters/NAME.onnx_adapter
    note: str | None = None  # one line for the user: why the fused graph was not written

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_NAME

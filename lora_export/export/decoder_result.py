"""What `export-decoder` returns (traced or fused), the files a folder of it holds (so `--force` may replace
them), and the two steps both writers take to fill one (tokenizer files, packed adapters): its own module, so the
traced (`export.decoder`) and fused (`export.fused`) writers share it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.pack import write_packed
from lora_export.artifacts.decoder_folder import (
    ADAPTER_SUFFIX,
    ADAPTERS_DIR,
    CONFIG_NAME,
    MODEL_NAME,
    TOKENIZER_FILES,
    DecoderFacts,
)
from lora_export.contract import GraphManifest, SlotTable

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


def copy_tokenizer(source: str | Path, folder: Path, *, keep_existing: bool = False) -> list[str]:
    """Tokenizer files of a local model directory into `folder`, so GenAI and `generate --prompt` can tokenize
    (`keep_existing`: leave a file `folder` already has, e.g. the GenAI builder's own)."""
    src = Path(source)
    if not src.is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (keep_existing and (folder / name).exists()):
            shutil.copyfile(src / name, folder / name)
            copied.append(name)
    return copied


def pack_folder_adapters(table: SlotTable, adapters: list[Adapter], tmp: Path, out: Path) -> dict[str, Path]:
    """Each adapter packed for `table` into `tmp/adapters/NAME.onnx_adapter` (the folder being written, published
    later as `out`); NAME -> its final path."""
    if not adapters:
        return {}
    (tmp / ADAPTERS_DIR).mkdir()
    packed = {}
    for a in adapters:
        write_packed(table.adapter_feeds(a), tmp / ADAPTERS_DIR / f"{a.name}{ADAPTER_SUFFIX}")
        packed[a.name] = out / ADAPTERS_DIR / f"{a.name}{ADAPTER_SUFFIX}"
    return packed

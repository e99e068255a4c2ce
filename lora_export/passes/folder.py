"""`optimize` on a decoder folder: the graph is optimized, everything else in the folder comes along.

A folder's adapters (`adapters/*.onnx_adapter`), `genai_config.json` and tokenizer files stay valid after
every pass (the LoRA inputs keep their names and float32 dtype), so they are copied as they are; the new
folder is written atomically.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_export.artifacts.decoder_folder import MODEL_NAME
from lora_export.errors import UserError


def optimize_folder(in_dir: Path, out_dir: str | Path, optimize_file: Callable[..., dict], **kwargs) -> dict[str, Any]:
    """Copy `in_dir` to `out_dir` with its `model.onnx` (and manifest) replaced by the optimized graph."""
    from lora_export.artifacts.fileio import atomic_dir

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not (in_dir / MODEL_NAME).is_file():
        raise UserError(f"{in_dir} is a folder without {MODEL_NAME}: give a graph or a decoder folder (export-decoder)")
    if out_dir.resolve() == in_dir.resolve():
        raise UserError(f"-o {out_dir} is the input folder: give a new folder")
    if out_dir.exists() and not kwargs.get("force"):
        raise UserError(f"{out_dir} already exists: pass --force to overwrite it")
    if out_dir.is_file():
        raise UserError(f"{out_dir} is a file: give a folder path for a decoder folder")
    replaceable = tuple(p.name for p in in_dir.iterdir())
    with atomic_dir(out_dir, replaceable=replaceable if kwargs.get("force") else ()) as tmp:
        for item in in_dir.iterdir():
            if item.name.startswith(MODEL_NAME):  # the graph, its external data and its manifest are rewritten
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        report = optimize_file(in_dir / MODEL_NAME, tmp / MODEL_NAME, **{**kwargs, "force": True})
    report["input"], report["output"] = str(in_dir), str(out_dir)
    return report

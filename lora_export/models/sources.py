"""ADAPTER on the command line and in the API: an `Adapter`, a PEFT directory, a contract file, or a
`sample:e2e/NAME` adapter shipped with the trained sample. The PEFT reader (`adapters.peft_io`) reads
files only; the sample names are resolved here, beside the models they belong to."""

from __future__ import annotations

from pathlib import Path

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.peft_io import read_adapter

SAMPLE_PREFIX = "sample:"


def adapter_path(source: str | Path) -> Path:
    """`sample:e2e/NAME` -> the shipped PEFT adapter directory; anything else -> its path."""
    if isinstance(source, str) and source.startswith(SAMPLE_PREFIX):
        from lora_export.models.e2e import resolve_adapter

        return resolve_adapter(source)
    return Path(source)


def open_adapter(source: str | Path | Adapter, *, name: str | None = None, allow_nonfinite: bool = False) -> Adapter:
    """An `Adapter` as it is, else the adapter read from `source` (named `name`, else after its file)."""
    if isinstance(source, Adapter):
        return source
    return read_adapter(adapter_path(source), name=name, allow_nonfinite=allow_nonfinite)

"""The standard graphs every measurement compares, written in one place: base, merged, branched and bank.

- `base`: the model without adapter (`export_merged(loaded, None, ...)`);
- `merged`: `adapter` folded into the weights (`export_merged(loaded, adapter, ...)`);
- `branched`: an `inputs`-layout graph with slots for `branched_adapters` (default: `[adapter]`);
- `bank`: a `bank`-layout graph holding `bank_adapters` (default: `[adapter]`), `bank_max_rank` when given.

The bench sweep, the reference suite, the GPU check, the parity-noise measurement and the committed
reference graphs all export through `export_standard_graph(s)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_export.adapters.adapter import Adapter
from lora_export.models.loading import LoadedModel

STANDARD_KINDS = ("base", "merged", "branched", "bank")

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class StandardGraph:
    kind: str
    path: Path
    seconds: float  # wall time of the export


def export_standard_graph(
    loaded: LoadedModel,
    kind: str,
    path: str | Path,
    adapter: Adapter | None,
    *,
    branched_adapters: list[Adapter] | None = None,
    bank_adapters: list[Adapter] | None = None,
    bank_max_rank: int | None = None,
    dtype: str = "fp32",
    force: bool = False,
) -> StandardGraph:
    """Export one standard graph of `kind` to `path`, timed."""
    from lora_export.export.branched import export_branched
    from lora_export.export.merged import export_merged

    if kind not in STANDARD_KINDS:
        raise ValueError(f"unknown standard graph {kind!r}; choose from {', '.join(STANDARD_KINDS)}")
    t0 = time.perf_counter()
    if kind == "base":
        result = export_merged(loaded, None, path, dtype=dtype, force=force)
    elif kind == "merged":
        result = export_merged(loaded, adapter, path, dtype=dtype, force=force)
    elif kind == "branched":
        adapters = list(branched_adapters) if branched_adapters is not None else [adapter]
        result = export_branched(loaded, path, adapters=adapters, dtype=dtype, force=force)
    else:
        adapters = list(bank_adapters) if bank_adapters is not None else [adapter]
        result = export_branched(
            loaded, path, adapters=adapters, layout="bank", max_rank=bank_max_rank, dtype=dtype, force=force
        )
    return StandardGraph(kind, Path(result.path), time.perf_counter() - t0)


def export_standard_graphs(
    loaded: LoadedModel,
    workdir: str | Path,
    adapter: Adapter | None,
    *,
    kinds: tuple[str, ...] | list[str] = STANDARD_KINDS,
    names: dict[str, str] | None = None,
    branched_adapters: list[Adapter] | None = None,
    bank_adapters: list[Adapter] | None = None,
    bank_max_rank: int | None = None,
    dtype: str = "fp32",
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, StandardGraph]:
    """Export `kinds` (in that order) into `workdir` as `names[kind]` (default `KIND.onnx`): kind -> graph."""
    workdir = Path(workdir)
    names = names or {}
    out = {}
    for k, kind in enumerate(kinds):
        if progress:
            progress(f"exporting {kind} graph", k, len(kinds))
        out[kind] = export_standard_graph(
            loaded,
            kind,
            workdir / names.get(kind, f"{kind}.onnx"),
            adapter,
            branched_adapters=branched_adapters,
            bank_adapters=bank_adapters,
            bank_max_rank=bank_max_rank,
            dtype=dtype,
            force=force,
        )
    if progress:
        progress("exports done", len(kinds), len(kinds))
    return out

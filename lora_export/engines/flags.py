"""Which network-creation and builder flags to use, by TensorRT version and graph precision.

Pure: takes a version tuple and returns flag *names*; `build.py` turns names into TensorRT enums. So the
policy is tested with made-up versions on machines without TensorRT.

Policy:
- TensorRT < 10: refused (the name-based tensor API and `execute_async_v3` this tool uses are 10.x).
- TensorRT 10.x: a graph whose floating tensors are fp16/bf16 is built STRONGLY_TYPED (the graph's
  types are obeyed, no FP16 builder flag); an fp32 graph is built weakly typed with no precision flag
  (fp32, TF32 allowed by TensorRT's default).
- TensorRT >= 11: networks are always strongly typed; the FP16/BF16/INT8 builder flags were removed
  and STRONGLY_TYPED is deprecated and ignored, so no precision flag of any kind is passed. Precision
  comes from the graph (`lora-export optimize --fp16`, or export with `--dtype fp16`).
- `refit=True` adds REFIT (weights may change to any values), never REFIT_IDENTICAL (which only allows
  the build-time values again, for weight-stripped plans).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lora_export.errors import MissingDependencyError

MIN_MAJOR = 10


@dataclass(frozen=True)
class FlagChoice:
    """Flag names for `builder.create_network` and `config.set_flag`."""

    network_flags: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()
    strongly_typed: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def select_flags(version: tuple[int, ...], precision: str, *, refit: bool) -> FlagChoice:
    """The flags for TensorRT `version` building a graph of `precision` ('fp32', 'fp16' or 'bf16')."""
    if not version or version[0] < MIN_MAJOR:
        found = ".".join(map(str, version)) or "unknown"
        raise MissingDependencyError(f"TensorRT {found} found; lora-export needs TensorRT 10 or 11")
    builder = ("REFIT",) if refit else ()
    notes: list[str] = []
    if version[0] >= 11:
        notes.append("TensorRT >= 11: always strongly typed; precision comes from the graph")
        return FlagChoice((), builder, True, tuple(notes))
    if precision in ("fp16", "bf16"):
        notes.append(f"{precision} graph on TensorRT 10: STRONGLY_TYPED network (graph types obeyed)")
        return FlagChoice(("STRONGLY_TYPED",), builder, True, tuple(notes))
    notes.append("fp32 graph on TensorRT 10: weakly typed, no precision flags (fp32/TF32)")
    return FlagChoice((), builder, False, tuple(notes))

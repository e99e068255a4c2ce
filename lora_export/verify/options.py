"""What `verify` is asked to do, as typed options: one backend against another (`BackendCheck`), a decoder
folder's greedy generation (`GenerationCheck`), or a decoder folder's task scores (`TaskCheck`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BackendCheck:
    """`candidate` against `reference` on every (seed, shape); see `verify.check.verify_backends`."""

    reference: str = "torch"
    candidate: str = "ort"
    onnx_path: str | Path | None = None
    engine_path: str | Path | None = None
    shapes: list[tuple[int, int]] | None = None
    seeds: tuple[int, ...] | list[int] = (0,)
    atol: dict[str, float] | None = None
    rtol: dict[str, float] | None = None
    providers: list[str] | None = None
    check_effect: bool = True
    save_inputs: str | Path | None = None
    oracle: str = "auto"  # whose LoRA the torch side runs: PEFT ("auto": when installed), or lora-export's
    criteria: dict | None = None  # quantized graphs: agreement criteria per output (default by scheme)
    by_layer: bool | None = None  # one piece of the model at a time; None: when the weights would not fit


@dataclass(frozen=True)
class GenerationCheck:
    """Greedy tokens of a decoder folder vs transformers generate (shapes: ROWS x LONGEST_PROMPT)."""

    new_tokens: int = 16
    shapes: list[tuple[int, int]] | None = None
    seeds: tuple[int, ...] | list[int] = (0,)
    atol: float | None = None


@dataclass(frozen=True)
class TaskCheck:
    """Task scores of a decoder folder of the trained sample next to PyTorch + PEFT's on the same items."""

    task: str = "e2e"
    split: str = "test"
    limit: int | None = None
    tolerance: float | None = None  # score points a quantized / fp16 folder may differ; fp32 must be exact

"""`Batch`: the model-side state of rows generating together, and the two ways rows come and go.

A batch holds, per row, a caller key, its adapter, its next position id and next-token logits; and for all
rows the attention mask and the KV cache (`2 * layers` values `[rows, kv_heads, past, head]`, ONNX Runtime
`OrtValue`s between steps, or numpy arrays without IO binding). Rows are left-aligned to a common past
length: a row's padding slots have mask 0 and zero KV, so a row attends only to its own tokens and computes
what it would alone. Position ids are per row (its own token count), never the column index.

- `join(a, b)`: rows of `b` (a fresh prefill) join the running batch `a` at a step boundary: both KV caches
  are left-padded to the longer past (masked slots) and stacked.
- `select(batch, keep)`: the rows in `keep` stay (finished rows leave); columns no remaining row attends to
  are trimmed from the left, so a long-running batch does not grow without bound.

Both copy the KV cache once (numpy), which is why they happen at step boundaries, not every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Batch:
    keys: list[Any]  # the caller's id per row
    adapters: list[str | None]  # adapter per row (None = base model)
    mask: np.ndarray  # (rows, past) int64, 1 = a real token
    positions: np.ndarray  # (rows,) int64: the position id the row's next token gets
    past: list[Any]  # 2*layers values (rows, kv_heads, past, head): key, value per layer
    logits: np.ndarray  # (rows, vocab): each row's next-token logits
    lora: Any = field(default=None, repr=False)  # prepared LoRA feeds for these rows (the generator's)

    @property
    def rows(self) -> int:
        return len(self.keys)

    @property
    def past_length(self) -> int:
        return int(self.mask.shape[1])

    def row_of(self, key: Any) -> int:
        return self.keys.index(key)


def as_numpy(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else np.asarray(value)


def as_values(arrays: list[np.ndarray], ort_values: bool) -> list[Any]:
    if not ort_values:
        return [np.ascontiguousarray(a) for a in arrays]
    import onnxruntime as ort

    return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays]


def _left_pad(batch: Batch, length: int) -> tuple[np.ndarray, list[np.ndarray]]:
    pad = length - batch.past_length
    mask = np.pad(batch.mask, ((0, 0), (pad, 0)))
    past = [np.pad(as_numpy(v), ((0, 0), (0, 0), (pad, 0), (0, 0))) for v in batch.past]
    return mask, past


def join(a: Batch, b: Batch, ort_values: bool) -> Batch:
    """`a`'s rows then `b`'s, KV caches left-padded to the longer past. Neither input is used afterwards."""
    if a.rows == 0:
        return b
    if b.rows == 0:
        return a
    length = max(a.past_length, b.past_length)
    mask_a, past_a = _left_pad(a, length)
    mask_b, past_b = _left_pad(b, length)
    past = [np.concatenate([x, y], axis=0) for x, y in zip(past_a, past_b)]
    return Batch(
        keys=a.keys + b.keys,
        adapters=a.adapters + b.adapters,
        mask=np.concatenate([mask_a, mask_b], axis=0),
        positions=np.concatenate([a.positions, b.positions]),
        past=as_values(past, ort_values),
        logits=np.concatenate([a.logits, b.logits], axis=0),
    )


def select(batch: Batch, keep: Sequence[int], ort_values: bool) -> Batch:
    """The rows `keep` (indices, in that order), with left columns no kept row attends to trimmed."""
    keep = list(keep)
    if keep == list(range(batch.rows)):
        return batch
    index = np.asarray(keep, dtype=np.int64)
    mask = batch.mask[index]
    used = np.flatnonzero(mask.any(axis=0))
    start = int(used[0]) if used.size else mask.shape[1]
    past = [as_numpy(v)[index, :, start:, :] for v in batch.past]
    return Batch(
        keys=[batch.keys[i] for i in keep],
        adapters=[batch.adapters[i] for i in keep],
        mask=np.ascontiguousarray(mask[:, start:]),
        positions=batch.positions[index],
        past=as_values(past, ort_values),
        logits=batch.logits[index],
    )

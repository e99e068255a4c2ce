"""`Batch`: the model-side state of rows generating together, and the two ways rows come and go.

A batch holds, per row, a caller key, its adapter, its next position id and next-token logits; and for all
rows the attention mask and the KV cache (`2 * layers` values `[rows, kv_heads, past, head]`, ONNX Runtime
`OrtValue`s between steps, or numpy arrays without IO binding). A row's padding slots have mask 0, so a row
attends only to its own tokens and computes what it would alone. Position ids are per row (its own token
count), never the column index. Two alignments, by the graph:

- left (traced graphs: the cache is a Concat, new tokens go at the end): rows are left-padded to a common past
  length, the padding KV zero;
- right (`right=True`, fused graphs: GroupQueryAttention takes per-row sequence lengths, `seqlens_k` = the
  mask's row sums - 1, and writes each row's new tokens at its own length): row i's tokens are columns
  0..len_i-1, whatever lies beyond is never attended to.

- `join(a, b)`: rows of `b` (a fresh prefill) join the running batch `a` at a step boundary: both KV caches
  are padded (on the alignment's side) to the longer past and stacked.
- `select(batch, keep)`: the rows in `keep` stay (finished rows leave); columns no remaining row attends to
  are trimmed, so a long-running batch does not grow without bound.

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
    right: bool = False  # rows right-padded (per-row sequence lengths: fused graphs), else left-padded

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


def _pad(batch: Batch, length: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """`batch`'s mask and KV padded to `length` columns: on the left, or the right for right-aligned rows."""
    pad = length - batch.past_length
    side = (0, pad) if batch.right else (pad, 0)
    mask = np.pad(batch.mask, ((0, 0), side))
    past = [np.pad(as_numpy(v), ((0, 0), (0, 0), side, (0, 0))) for v in batch.past]
    return mask, past


def join(a: Batch, b: Batch, ort_values: bool) -> Batch:
    """`a`'s rows then `b`'s, KV caches padded to the longer past. Neither input is used afterwards."""
    if a.rows == 0:
        return b
    if b.rows == 0:
        return a
    if a.right != b.right:
        raise ValueError("a left-padded and a right-padded batch cannot join")
    length = max(a.past_length, b.past_length)
    mask_a, past_a = _pad(a, length)
    mask_b, past_b = _pad(b, length)
    past = [np.concatenate([x, y], axis=0) for x, y in zip(past_a, past_b)]
    return Batch(
        keys=a.keys + b.keys,
        adapters=a.adapters + b.adapters,
        mask=np.concatenate([mask_a, mask_b], axis=0),
        positions=np.concatenate([a.positions, b.positions]),
        past=as_values(past, ort_values),
        logits=np.concatenate([a.logits, b.logits], axis=0),
        right=a.right,
    )


def select(batch: Batch, keep: Sequence[int], ort_values: bool) -> Batch:
    """The rows `keep` (indices, in that order), with the columns no kept row attends to trimmed."""
    keep = list(keep)
    if keep == list(range(batch.rows)):
        return batch
    index = np.asarray(keep, dtype=np.int64)
    mask = batch.mask[index]
    used = np.flatnonzero(mask.any(axis=0))
    if batch.right:
        start, end = 0, int(used[-1]) + 1 if used.size else 0
    else:
        start, end = int(used[0]) if used.size else mask.shape[1], mask.shape[1]
    past = [as_numpy(v)[index, :, start:end, :] for v in batch.past]
    return Batch(
        keys=[batch.keys[i] for i in keep],
        adapters=[batch.adapters[i] for i in keep],
        mask=np.ascontiguousarray(mask[:, start:end]),
        positions=batch.positions[index],
        past=as_values(past, ort_values),
        logits=batch.logits[index],
        right=batch.right,
    )

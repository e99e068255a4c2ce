"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling (numpy only).

Parameters and random state are per row, so a row samples the same tokens whatever batch it runs in:
each row owns a `numpy.random.Generator` seeded with its own `seed` (none = fresh entropy).

    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=7, max_new_tokens=64)
    rng = params.rng()
    token = pick(logits_row, params, rng)          # logits_row: [vocab]

`temperature == 0` or `top_k == 1` is greedy (`argmax`, the lowest id on ties, as `torch.argmax`).
Order of the filters, as transformers' warpers apply them: temperature, then top-k, then top-p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from lora_export.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """How one row generates: sampling knobs, a seed, and when to stop."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None
    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()  # stop after any of these (the stop token is kept in the output)
    ignore_eos: bool = False  # keep going past the model's eos ids
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.temperature < 0 or not np.isfinite(self.temperature):
            raise UserError(f"temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError(f"top_k {self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p {self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens {self.max_new_tokens} must be >= 1")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def with_(self, **changes) -> SamplingParams:
        return replace(self, **changes)


def pick(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """The next token for one row from its logits `[vocab]`."""
    if params.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / params.temperature  # (V,)
    if params.top_k and params.top_k < scores.shape[0]:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    order = np.argsort(-scores, kind="stable")  # (V,) best first
    probs = np.exp(scores[order] - scores[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = np.cumsum(probs) - probs < params.top_p  # the smallest prefix reaching top_p (the best always kept)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    rng = rng if rng is not None else np.random.default_rng()
    choice = int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"))
    return int(order[min(choice, len(order) - 1)])


def pick_rows(
    logits: np.ndarray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator | None]
) -> np.ndarray:
    """Next tokens `[rows]` from logits `[rows, vocab]`, each row with its own parameters and random state."""
    if all(p.greedy for p in params):
        return np.argmax(logits, axis=-1).astype(np.int64)
    return np.array([pick(logits[i], params[i], rngs[i]) for i in range(len(params))], dtype=np.int64)

"""runtime.sampling: greedy, temperature, top-k, top-p and per-row seeds (numpy only, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from lora_export.errors import UserError
from lora_export.runtime.sampling import SamplingParams, pick, pick_rows

LOGITS = np.log(np.array([0.05, 0.5, 0.2, 0.15, 0.1], dtype=np.float32))  # softmax = these probabilities


def _draws(params: SamplingParams, n: int = 4000) -> np.ndarray:
    rng = params.rng()
    return np.array([pick(LOGITS, params, rng) for _ in range(n)])


def test_greedy_is_argmax_with_the_lowest_id_on_ties():
    assert pick(LOGITS, SamplingParams(), None) == 1
    assert pick(np.array([1.0, 3.0, 3.0]), SamplingParams(), None) == 1
    assert pick(LOGITS, SamplingParams(temperature=5.0, top_k=1), None) == 1  # top-k 1 is greedy


def test_temperature_1_samples_the_softmax():
    counts = np.bincount(_draws(SamplingParams(temperature=1.0, seed=0)), minlength=5) / 4000
    np.testing.assert_allclose(counts, np.exp(LOGITS) / np.exp(LOGITS).sum(), atol=0.03)


def test_top_k_and_top_p_keep_only_the_best_tokens():
    assert set(_draws(SamplingParams(temperature=1.0, top_k=2, seed=1)).tolist()) == {1, 2}
    # top_p 0.6: 0.5 (id 1) is not enough, 0.5 + 0.2 reaches it: ids 1 and 2 only
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.6, seed=2)).tolist()) == {1, 2}
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.01, seed=3)).tolist()) == {1}
    hot = np.bincount(_draws(SamplingParams(temperature=100.0, seed=4)), minlength=5) / 4000
    assert hot.min() > 0.15  # a high temperature flattens the distribution


def test_seeds_reproduce_per_row_whatever_the_batch():
    params = [SamplingParams(temperature=1.0, seed=s) for s in (5, 6, 5)]
    rngs = [p.rng() for p in params]
    logits = np.stack([LOGITS] * 3)
    rows = np.stack([pick_rows(logits, params, rngs) for _ in range(50)])
    assert (rows[:, 0] == rows[:, 2]).all() and not (rows[:, 0] == rows[:, 1]).all()
    alone_rng = SamplingParams(temperature=1.0, seed=6).rng()
    alone = [pick(LOGITS, params[1], alone_rng) for _ in range(50)]
    assert rows[:, 1].tolist() == alone


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_parameters_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        SamplingParams(**kwargs)

"""All timing lives here: warm-up, interleaved iterations over prepared input sets, percentiles, ratios.

A `Candidate` is something to time: a runner (anything with `prepare(feeds) -> handle`,
`run_prepared(handle)` and `synchronize()`, see `lora_export.backends`) plus several input sets, or a
plain callable. `measure(candidates, ...)` times them *together*:

- inputs are prepared once, before any timing (device copies, OrtValues, LoRA tensors);
- each timed call uses the next prepared input set in turn (rotation), so no single input is cached;
- `warmup` untimed rounds first, then `iters` timed rounds; one round runs every candidate once,
  in an order that rotates and is shuffled per round (seeded), so drift in the machine (thermal,
  noisy neighbours) spreads over all candidates instead of favouring the one that ran first;
- each timed call ends with `synchronize()` (CUDA streams) inside the timed region;
- the clock is injectable (tests use a fake one).

Results are medians and percentiles; ratios are of medians, plus the median of per-round ratios
(rounds are aligned because every candidate runs once per round), which cancels slow drift.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Clock = Callable[[], float]  # seconds


@dataclass
class Candidate:
    """One thing to time. `handles` are prepared inputs; `run(handle)` must not return before it is done."""

    name: str
    run: Callable[[Any], Any]
    handles: list[Any] = field(default_factory=lambda: [None])
    synchronize: Callable[[], None] | None = None
    tokens: int = 0  # tokens processed per call (batch * seq), for throughput
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_runner(
        cls, name: str, runner, feed_sets: Sequence[dict], *, tokens: int = 0, meta: dict | None = None
    ) -> Candidate:
        """Prepare every input set now (outside timing) with the runner's `prepare`, if it has one."""
        prepare = getattr(runner, "prepare", None)
        run_prepared = getattr(runner, "run_prepared", None)
        if prepare is None or run_prepared is None:  # a bare Polygraphy-style runner: infer(feeds)
            handles, run = list(feed_sets), runner.infer
        else:
            handles, run = [prepare(f) for f in feed_sets], run_prepared
        return cls(name, run, handles, getattr(runner, "synchronize", None), tokens, dict(meta or {}))

    @classmethod
    def from_callable(cls, name: str, fn: Callable[[], Any], *, meta: dict | None = None) -> Candidate:
        return cls(name, lambda _h: fn(), [None], None, 0, dict(meta or {}))


@dataclass
class LatencyStats:
    """Per-call latency in milliseconds."""

    name: str
    samples_ms: list[float]
    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    std: float
    tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def iters(self) -> int:
        return len(self.samples_ms)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / (self.p50 / 1e3) if self.tokens and self.p50 > 0 else None

    def to_dict(self, samples: bool = True) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        d["iters"] = self.iters
        d["tokens_per_s"] = self.tokens_per_s
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LatencyStats:
        keys = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in d.items() if k in keys}
        data.setdefault("samples_ms", [])
        return cls(**data)


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no samples."""
    if len(samples) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def summarize(name: str, samples_ms: Sequence[float], *, tokens: int = 0, meta: dict | None = None) -> LatencyStats:
    s = np.asarray(samples_ms, dtype=np.float64)
    if s.size == 0:
        nan = float("nan")
        return LatencyStats(name, [], nan, nan, nan, nan, nan, nan, nan, tokens, dict(meta or {}))
    return LatencyStats(
        name,
        [float(x) for x in s],
        percentile(s, 50),
        percentile(s, 90),
        percentile(s, 99),
        float(s.mean()),
        float(s.min()),
        float(s.max()),
        float(s.std()),
        tokens,
        dict(meta or {}),
    )


def schedule(n: int, rounds: int, seed: int = 0, mode: str = "shuffle") -> list[list[int]]:
    """The order of candidates in each round.

    `rotate`: round k starts at candidate k mod n (each candidate leads equally often).
    `shuffle` (default): a seeded permutation per round, balanced so each candidate leads equally often.
    `sequential`: all rounds of candidate 0, then candidate 1, ... (for contrast only; drift-prone).
    """
    if mode == "sequential":
        return [[i] for i in range(n) for _ in range(rounds)]
    rng = random.Random(seed)
    out = []
    for k in range(rounds):
        first = k % n
        rest = [i for i in range(n) if i != first]
        if mode == "shuffle":
            rng.shuffle(rest)
        else:  # rotate
            rest = [(first + j) % n for j in range(1, n)]
        out.append([first, *rest])
    return out


@dataclass
class Measurement:
    """What `measure` returns: stats per candidate (in input order), and the settings it ran with."""

    stats: list[LatencyStats]
    warmup: int
    iters: int
    order: str
    seed: int
    threads: dict[str, Any] = field(default_factory=dict)

    def by_name(self) -> dict[str, LatencyStats]:
        return {s.name: s for s in self.stats}

    def ratio(self, num: str, den: str) -> Ratio:
        stats = self.by_name()
        return ratio(stats[num], stats[den])


def measure(
    candidates: Sequence[Candidate],
    *,
    warmup: int = 5,
    iters: int = 50,
    seed: int = 0,
    order: str = "shuffle",
    clock: Clock = time.perf_counter,
    on_round: Callable[[int, int], None] | None = None,
) -> Measurement:
    """Time every candidate `iters` times, interleaved; see the module docstring for the method."""
    if not candidates:
        return Measurement([], warmup, iters, order, seed, thread_settings())
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique: {names}")
    n = len(candidates)
    samples: list[list[float]] = [[] for _ in range(n)]
    calls = [0] * n

    def call(i: int, timed: bool) -> None:
        c = candidates[i]
        handle = c.handles[calls[i] % len(c.handles)]
        calls[i] += 1
        if timed:
            t0 = clock()
            c.run(handle)
            if c.synchronize is not None:
                c.synchronize()
            samples[i].append((clock() - t0) * 1e3)
        else:
            c.run(handle)
            if c.synchronize is not None:
                c.synchronize()

    for rnd in schedule(n, warmup, seed + 1, "rotate" if order == "sequential" else order):
        for i in rnd:
            call(i, False)
    plan = schedule(n, iters, seed, order)
    for k, rnd in enumerate(plan):
        for i in rnd:
            call(i, True)
        if on_round is not None:
            on_round(k + 1, len(plan))
    stats = [summarize(c.name, s, tokens=c.tokens, meta=c.meta) for c, s in zip(candidates, samples)]
    return Measurement(stats, warmup, iters, order, seed, thread_settings())


class StepTimes:
    """Times inside calls that produce a stream of items (generated tokens): the call runs `start()` when it
    begins and `mark()` as each item arrives; the first mark gives the time to the first item (TTFT), the later
    ones the time per item. One entry per call, so the calls of warm-up rounds can be dropped (`timed(warmup)`).
    """

    def __init__(self, clock: Clock = time.perf_counter):
        self.clock = clock
        self.calls: list[tuple[float, list[float]]] = []  # (first item ms, [next item ms, ...]) per call
        self._last = 0.0
        self._steps: list[float] | None = None

    def start(self) -> None:
        self._last, self._steps = self.clock(), None

    def mark(self) -> None:
        now = self.clock()
        ms = (now - self._last) * 1e3
        if self._steps is None:
            self._steps = []
            self.calls.append((ms, self._steps))
        else:
            self._steps.append(ms)
        self._last = now

    def timed(self, skip: int) -> tuple[list[float], list[float], list[float]]:
        """(first-item ms per call, every later item's ms pooled, median item ms per call), after `skip` calls."""
        calls = self.calls[skip:]
        firsts = [f for f, _ in calls]
        steps = [ms for _, s in calls for ms in s]
        medians = [float(np.median(s)) for _, s in calls if s]
        return firsts, steps, medians


def time_calls(fn: Callable[[], Any], *, iters: int, warmup: int = 0, clock: Clock = time.perf_counter) -> list[float]:
    """Milliseconds for each of `iters` calls of `fn` (wall time of one-off steps like export or pack)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = clock()
        fn()
        out.append((clock() - t0) * 1e3)
    return out


@dataclass
class Ratio:
    """`numerator / denominator` of median latencies; `paired` is the median of per-round ratios."""

    numerator: str
    denominator: str
    value: float
    paired: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def ratio(num: LatencyStats, den: LatencyStats) -> Ratio:
    value = num.p50 / den.p50 if den.p50 and den.p50 > 0 else float("nan")
    paired = None
    if num.samples_ms and len(num.samples_ms) == len(den.samples_ms):
        a, b = np.asarray(num.samples_ms), np.asarray(den.samples_ms)
        ok = b > 0
        if ok.any():
            paired = float(np.median(a[ok] / b[ok]))
    return Ratio(num.name, den.name, float(value), paired)


# -- threads -------------------------------------------------------------------------------------------------


def set_threads(threads: int | None) -> None:
    """Set PyTorch's intra-op threads (ONNX Runtime sessions take theirs at creation: pass `threads=`)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def thread_settings(ort_threads: int | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # pragma: no cover - torch is a dependency
        pass
    info["ort_intra_op_threads"] = ort_threads or 0  # 0 = ONNX Runtime's default (one per physical core)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info

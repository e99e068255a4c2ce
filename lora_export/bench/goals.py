"""The reference suite's records: a goal (metric, bound, status), the suite's results, and its options."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Goal:
    metric: str
    issue: int
    goal: str  # human text, e.g. "<= 1.02"
    measured: float | None
    unit: str = ""
    limit: float | None = None  # numeric bound; None = reported only
    lower_is_better: bool = True
    detail: str = ""

    @property
    def status(self) -> str:
        if self.measured is None:
            return "skipped"
        if self.limit is None:
            return "reported"
        ok = self.measured <= self.limit if self.lower_is_better else self.measured >= self.limit
        return "met" if ok else "NOT met"

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "issue": self.issue,
            "goal": self.goal,
            "measured": self.measured,
            "unit": self.unit,
            "status": self.status,
            "detail": self.detail,
        }


@dataclass
class Suite:
    model: str
    quick: bool
    goals: list[Goal] = field(default_factory=list)
    latency: list[dict] = field(default_factory=list)  # rows: group, name, stats
    timings: dict[str, float] = field(default_factory=dict)  # one-off wall times, seconds
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteOptions:
    """What one suite run measures and how long; `SuiteOptions.make` fills what is not given (quick or full)."""

    quick: bool = False
    model: str = "sample:gpt2-small"
    iters: int = 60
    bank_iters: int = 20
    warmup: int = 5
    threads: int | None = None
    workdir: str | None = None
    sections: str = "all"  # all, core (issues 2-4), speed (issue 11)
    only: str | None = None  # "generation": only that group
    seq: int = 128
    bank_batch: int = 8
    input_sets: int = 3
    switch_iters: int = 1000
    pack_iters: int = 10
    speed_iters: int = 15
    speed_reps: int = 2
    speed_new_tokens: int = 128
    generation: bool = True
    gen_prompt: int = 32
    gen_tokens: int = 128
    gen_rounds: int = 5

    @classmethod
    def make(
        cls,
        quick: bool = False,
        *,
        model: str | None = None,
        iters: int | None = None,
        bank_iters: int | None = None,
        warmup: int | None = None,
        threads: int | None = None,
        workdir: str | None = None,
        sections: str = "all",
        only: str | None = None,
        speed_iters: int | None = None,
        speed_reps: int | None = None,
        speed_new_tokens: int | None = None,
        generation: bool | None = None,
        gen_rounds: int | None = None,
    ) -> SuiteOptions:
        q = quick
        return cls(
            quick=q,
            model=model or ("sample:gpt2" if q else "sample:gpt2-small"),
            iters=iters or (5 if q else 60),
            bank_iters=bank_iters or (3 if q else 20),
            warmup=warmup if warmup is not None else (1 if q else 5),
            threads=threads,
            workdir=workdir,
            sections=sections,
            only=only,
            seq=16 if q else 128,
            bank_batch=8,
            input_sets=2 if q else 3,
            switch_iters=50 if q else 1000,
            pack_iters=3 if q else 10,
            speed_iters=speed_iters or (2 if q else 15),
            speed_reps=speed_reps or (1 if q else 2),
            speed_new_tokens=speed_new_tokens or (6 if q else 128),
            generation=(not q) if generation is None else generation,
            gen_prompt=8 if q else 32,
            gen_tokens=8 if q else 128,
            gen_rounds=gen_rounds or (2 if q else 5),
        )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0

"""Timing logic with fake clocks and fake runners: percentiles, ordering, rotation, ratios (not speed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_export.bench.latency import (
    Candidate,
    LatencyStats,
    measure,
    percentile,
    ratio,
    schedule,
    summarize,
    thread_settings,
    time_calls,
)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Each call advances the fake clock by `cost(handle, call_number)` seconds; records what happened when."""

    def __init__(self, clock: FakeClock, cost, log: list, name: str):
        self.clock, self.cost, self.log, self.name = clock, cost, log, name
        self.calls = 0
        self.prepared: list = []

    def prepare(self, feeds):
        self.prepared.append(feeds)
        self.log.append(("prepare", self.name, self.clock.now))
        return feeds["x"]

    def run_prepared(self, handle):
        self.clock.now += self.cost(handle, len(self.log))
        self.calls += 1
        self.log.append(("run", self.name, handle))

    def synchronize(self):
        self.clock.now += 0.001  # pending device work: must land inside the timed region
        self.log.append(("sync", self.name, None))


def test_percentiles_and_summary():
    samples = list(range(1, 101))  # 1..100
    assert percentile(samples, 50) == pytest.approx(50.5)
    assert percentile(samples, 90) == pytest.approx(90.1)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert np.isnan(percentile([], 50))
    s = summarize("a", [3.0, 1.0, 2.0], tokens=128)
    assert (s.p50, s.min, s.max, s.mean, s.iters) == (2.0, 1.0, 3.0, 2.0, 3)
    assert s.tokens_per_s == pytest.approx(128 / 0.002)
    empty = summarize("e", [])
    assert empty.iters == 0 and np.isnan(empty.p50) and empty.tokens_per_s is None


@pytest.mark.parametrize("mode", ["rotate", "shuffle"])
def test_schedule_is_interleaved_and_balanced(mode):
    n, rounds = 4, 40
    plan = schedule(n, rounds, seed=3, mode=mode)
    assert len(plan) == rounds
    for rnd in plan:
        assert sorted(rnd) == list(range(n))  # every candidate once per round
    leads = [rnd[0] for rnd in plan]
    assert all(leads.count(i) == rounds // n for i in range(n))  # each leads equally often
    if mode == "shuffle":
        assert len({tuple(r) for r in plan}) > n  # not just rotations
    assert schedule(n, rounds, seed=3, mode=mode) == plan  # seeded


def test_sequential_schedule():
    assert schedule(2, 3, mode="sequential") == [[0], [0], [0], [1], [1], [1]]


def test_measure_prepares_outside_timing_rotates_inputs_and_syncs():
    clock, log = FakeClock(), []
    fast = FakeRunner(clock, lambda h, k: 0.010, log, "fast")
    slow = FakeRunner(clock, lambda h, k: 0.030 if h == 0 else 0.040, log, "slow")
    sets = [{"x": 0}, {"x": 1}, {"x": 2}]
    cands = [
        Candidate.from_runner("fast", fast, sets, tokens=8),
        Candidate.from_runner("slow", slow, sets, tokens=8),
    ]
    assert clock.now == 0.0 and len(fast.prepared) == 3  # prepared at construction, no time spent
    m = measure(cands, warmup=2, iters=9, clock=clock)
    fast_s, slow_s = m.stats
    assert fast.calls == slow.calls == 11
    assert fast_s.iters == slow_s.iters == 9
    assert fast_s.samples_ms == pytest.approx([11.0] * 9)  # 10 ms run + 1 ms sync
    # the slow runner's handles rotate 0,1,2,...: a third of the calls cost 30 ms, the rest 40 ms (+1 sync)
    assert sorted(slow_s.samples_ms) == pytest.approx([31.0] * 3 + [41.0] * 6)
    handles = [h for kind, name, h in log if kind == "run" and name == "slow"]
    assert handles == [0, 1, 2] * 3 + [0, 1]
    # every run is followed by its synchronize before the next run starts
    runs = [i for i, e in enumerate(log) if e[0] == "run"]
    assert all(log[i + 1][0] == "sync" and log[i + 1][1] == log[i][1] for i in runs)
    r = m.ratio("slow", "fast")
    assert r.value == pytest.approx(41.0 / 11.0)
    assert m.by_name()["fast"].tokens_per_s == pytest.approx(8 / 0.011)


def test_interleaving_cancels_drift_that_sequential_order_turns_into_a_fake_speedup():
    """Two identical candidates on a machine that slows down over time: only sequential order sees a gap."""

    def run(order: str):
        clock, log = FakeClock(), []
        cost = lambda h, k: 0.010 * (1 + 0.01 * k)  # noqa: E731 - drift grows with the number of events
        a, b = FakeRunner(clock, cost, log, "a"), FakeRunner(clock, cost, log, "b")
        cands = [Candidate.from_runner("a", a, [{"x": 0}]), Candidate.from_runner("b", b, [{"x": 0}])]
        return measure(cands, warmup=0, iters=40, clock=clock, order=order).ratio("b", "a")

    seq, inter = run("sequential"), run("shuffle")
    assert seq.value > 1.3  # b ran after a: drift looks like b being slower
    assert abs(inter.value - 1) < 0.05
    assert abs(inter.paired - 1) < 0.05


def test_measure_visits_each_candidate_once_per_round_and_reports_progress():
    order, rounds = [], []
    cands = [Candidate.from_callable(n, lambda n=n: order.append(n)) for n in "abc"]
    m = measure(cands, warmup=0, iters=6, clock=FakeClock(), on_round=lambda d, t: rounds.append((d, t)))
    assert [sorted(order[i : i + 3]) for i in range(0, 18, 3)] == [["a", "b", "c"]] * 6
    assert rounds[-1] == (6, 6)
    assert [s.name for s in m.stats] == ["a", "b", "c"]
    assert m.threads["cpu_count"] >= 1


def test_measure_rejects_duplicate_names_and_accepts_bare_runners():
    with pytest.raises(ValueError):
        measure([Candidate.from_callable("x", lambda: None)] * 2, iters=1)

    class Bare:  # Polygraphy-style: only infer(feeds)
        def __init__(self):
            self.seen = []

        def infer(self, feeds):
            self.seen.append(feeds["x"])
            return {}

    bare = Bare()
    measure([Candidate.from_runner("bare", bare, [{"x": 1}, {"x": 2}])], warmup=1, iters=3, clock=FakeClock())
    assert bare.seen == [1, 2, 1, 2]


def test_ratio_and_paired_ratio():
    a = summarize("a", [10, 20, 30])
    b = summarize("b", [5, 10, 15])
    r = ratio(a, b)
    assert r.value == pytest.approx(2.0) and r.paired == pytest.approx(2.0)
    c = summarize("c", [1, 2])  # not round-aligned with a: no paired ratio
    assert ratio(a, c).paired is None
    assert json.loads(json.dumps(r.to_dict()))["value"] == pytest.approx(2.0)


def test_stats_round_trip_through_json():
    s = summarize("ort/merged", [1.5, 2.5, 3.5], tokens=128, meta={"batch": 1})
    back = LatencyStats.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert LatencyStats.from_dict(json.loads(json.dumps(s.to_dict(samples=False)))).p99 == s.p99


def test_time_calls_and_thread_settings():
    clock = FakeClock()

    def step():
        clock.now += 0.002

    assert time_calls(step, iters=3, warmup=1, clock=clock) == pytest.approx([2.0, 2.0, 2.0])
    info = thread_settings(3)
    assert info["ort_intra_op_threads"] == 3 and "torch_threads" in info

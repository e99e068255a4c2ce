"""tools/bench_many_adapters.py --quick (lora_export.bench.many_adapters): a real `lora-export serve --adapter-dir`
(Ray Serve, started and stopped here) over more registered adapters than its `--max-cpu-adapters` cache, streamed
requests from the official `openai` client under one-adapter, uniform and Zipf loads: the cache evicts, stays
bounded, and the sampled rows equal PEFT `generate` for their adapters."""

from __future__ import annotations

import json

import pytest
from serve_helpers import free_port

from lora_export.bench.many_adapters import ManyAdaptersOptions, draws, lru_pass, run_many_adapters_bench

pytest.importorskip("ray")


def test_draws_and_the_cold_rule():
    assert draws("one", 100, 5, 0) == [0] * 5
    uniform, zipf = draws("uniform", 100, 2000, 0), draws("zipf", 100, 2000, 0)
    assert len(set(uniform)) > 90 and max(zipf.count(i) for i in set(zipf)) > 5 * max(uniform.count(i) for i in uniform)
    assert lru_pass(["a", "b", "a", "c", "a", "b"], 2, set()) == ([True, True, False, True, False, True], {"a", "b"})
    assert lru_pass(["w", "x"], 2, {"w"}) == ([False, True], {"w", "x"})


def test_quick_many_adapters_bench_evicts_and_matches_peft(tmp_path):
    md = tmp_path / "many.md"
    opts = ManyAdaptersOptions(
        workdir=tmp_path / "w", quick=True, adapters=12, cache=3, clients=4, requests=3, new_tokens=6,
        check_rows=3, port=free_port(), json=tmp_path / "many.json", markdown=md,
    )  # fmt: skip
    results = run_many_adapters_bench(opts)
    assert results["peft_rows_checked"] == 3 and results["peft_rows_equal"] == 3
    uniform = results["runs"]["uniform"][0]
    assert uniform["distinct_adapters"] > 3 and uniform["cold_requests"] > 0
    assert uniform["adapter_evictions"] > 0 and uniform["adapters_resident"] <= 3  # idle after the load: bounded
    assert results["rss_base_mb"] > 0 and results["uniform_over_one"] > 0
    assert json.loads((tmp_path / "many.json").read_text())["adapters"] == 12
    assert "| throughput uniform / one adapter >= 0.80 |" in md.read_text()

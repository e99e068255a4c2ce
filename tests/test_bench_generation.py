"""lora_export.bench.generation (tools/bench_generation.py): the generation rows of the suite report every goal."""

from __future__ import annotations

from lora_export.bench import generation as tool


def test_generation_bench_measures_every_goal(decoders, sample_cache):
    folders = {layout: decoders.folder("gpt2", layout) for layout in ("merged", "inputs", "bank")}
    bench = tool.measure_generation(
        folders, sample_cache("gpt2"), ["x", "y"], prompt_len=6, new_tokens=4, rounds=1, warmup=0
    )
    goals = {g["metric"].split(",")[0]: g for g in bench.goals}
    expected = (
        "merged decoder / PyTorch generate (KV cache)",
        "inputs decoder + adapter / merged decoder",
        "bank b4 (4 adapters) / inputs decoder b4 (1 adapter)",
        "our generator / ONNX Runtime GenAI",
        "plain numpy feeds / IO binding (KV as OrtValues)",
        "old path (full graph per token) / merged decoder",
    )
    for key in expected:
        assert goals[key]["measured"] > 0, key
    names = {r["name"] for r in bench.rows}
    assert "genai/merged folder ms/token" in names and "ort/bank decoder, 4 adapters (b4) ttft" in names
    per_token = [r for r in bench.rows if r["name"] == "ort/merged decoder ms/token"][0]
    assert per_token["iters"] == 3  # 4 tokens: the first is the time to first token, 3 per-token samples
    assert "NO" not in bench.notes[0]  # every path generated PyTorch's greedy tokens

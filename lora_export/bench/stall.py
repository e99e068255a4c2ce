"""Does one huge prompt stall everyone else? Small requests' latency on `lora-export serve`, alone and while
another client sends multi-megabyte text prompts back to back.

Its command line is `tools/bench_serve_stall.py`.

The folder is the serving benchmark's (`bench.serve.prepare`: a bank folder, adapters adapter0..3) of a model
with a tokenizer (default the real SmolLM2 cut to 4 layers), served with one engine replica, `--threads 1` and a
body limit above the big prompt. In each round, for `seconds`: phase "alone", one closed-loop client sends small
requests (a short text prompt, `new_tokens` greedy tokens, an adapter); phase "during", the same client while a
second one sends `big_mb` MB of text as the prompt, back to back, each answered with a 400
`context_length_exceeded` (over context × the longest token's characters it is refused untokenized; under that,
after it is tokenized: `--big-mb 0.6` measures that case). Phases alternate over `rounds`, so the machine's drift
hits both; latencies are pooled per phase.

Goal (issue 26): p99 of the small requests during the big prompts within 200 ms of their p99 alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from lora_export.bench.latency import percentile
from lora_export.bench.report import publish, run_machine
from lora_export.bench.serve import Server, prepare

GOAL_MS = 200.0
SMALL_PROMPT = "Once upon a time, in a small village by the sea,"


@dataclass
class StallOptions:
    workdir: Path = Path("/tmp/lora_export_stall")
    model: str = "sample:smollm2-4l"
    big_mb: float = 5.0
    rounds: int = 3
    seconds: float = 20.0  # each phase of each round
    new_tokens: int = 4
    port: int = 8768
    seed: int = 0
    json: Path | None = None


def big_text(megabytes: float, seed: int) -> str:
    """Prose-like text of about `megabytes` MB: seeded words from a small list, with punctuation."""
    rng = random.Random(seed)
    words = "the of and to in is that for it as was with be by on not he this are or his from at which".split()
    words += "lantern harbour quietly remembered evening travellers mountains whisper ordinary".split()
    out, size = [], 0
    while size < megabytes * 1e6:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 18))).capitalize() + ". "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)


async def _small(url: str, deadline: float, latencies: list[float], new_tokens: int) -> None:
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) as api:
        i = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            await api.completions.create(
                model=f"adapter{i % 4}", prompt=SMALL_PROMPT, max_tokens=new_tokens, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            latencies.append(time.perf_counter() - t0)
            i += 1


async def _big(url: str, body: bytes, deadline: float, outcomes: list[tuple[int, float]]) -> None:
    import httpx2

    async with httpx2.AsyncClient(timeout=600) as raw:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = await raw.post(f"{url}/completions", content=body, headers={"Content-Type": "application/json"})
            outcomes.append((r.status_code, time.perf_counter() - t0))


async def _phase(url: str, seconds: float, new_tokens: int, body: bytes | None) -> tuple[list, list]:
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    outcomes: list[tuple[int, float]] = []
    tasks = [_small(url, deadline, latencies, new_tokens)]
    if body is not None:
        tasks.append(_big(url, body, deadline, outcomes))
    await asyncio.gather(*tasks)
    return latencies, outcomes


def run_stall_bench(opts: StallOptions) -> dict:
    """The benchmark (see the module docstring): its results, printed and written as JSON."""
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request otherwise
    workdir = opts.workdir / opts.model.replace(":", "_")
    workdir.mkdir(parents=True, exist_ok=True)
    folder, _ = prepare(workdir, opts.model, 16, 1, seed=opts.seed)
    text = big_text(opts.big_mb, opts.seed)
    body = json.dumps({"model": "adapter0", "prompt": text, "max_tokens": 4}).encode()
    limit = 2 * len(body)
    load_at_start = os.getloadavg()
    extra = ["--threads", "1", "--max-request-bytes", str(limit)]
    server = Server(folder, opts.port, max_batch_size=8, wait_ms=5.0, extra=extra)
    alone: list[float] = []
    during: list[float] = []
    big: list[tuple[int, float]] = []
    try:
        asyncio.run(_phase(server.url, 3.0, opts.new_tokens, None))  # warm: every adapter loaded
        for r in range(opts.rounds):
            a, _ = asyncio.run(_phase(server.url, opts.seconds, opts.new_tokens, None))
            d, b = asyncio.run(_phase(server.url, opts.seconds, opts.new_tokens, body))
            alone += a
            during += d
            big += b
            print(f"round {r + 1}: alone {len(a)} requests, during {len(d)} requests and {len(b)} big prompts",
                  flush=True)  # fmt: skip
    finally:
        server.close()
    ms = {k: [x * 1000 for x in v] for k, v in (("alone", alone), ("during", during))}
    results = {
        "model": opts.model,
        "big_prompt_bytes": len(text.encode()),
        "rounds": opts.rounds,
        "seconds_per_phase": opts.seconds,
        "small_requests": {k: len(v) for k, v in ms.items()},
        "p50_ms": {k: round(percentile(v, 50), 1) for k, v in ms.items()},
        "p99_ms": {k: round(percentile(v, 99), 1) for k, v in ms.items()},
        "big_prompts": len(big),
        "big_statuses": sorted({s for s, _ in big}),
        "big_median_s": round(percentile([t for _, t in big], 50), 2),
        "machine": run_machine(load_at_start),
    }
    results["p99_delta_ms"] = round(results["p99_ms"]["during"] - results["p99_ms"]["alone"], 1)
    results["passed"] = bool(big) and results["p99_delta_ms"] <= GOAL_MS and results["big_statuses"] == [400]
    publish(results, opts.json, None, None)
    print(table(results))
    return results


def table(r: dict) -> str:
    status = "met" if r["passed"] else "NOT met"
    return "\n".join(
        [
            "| small requests | alone | during big prompts |",
            "|---|---|---|",
            f"| count | {r['small_requests']['alone']} | {r['small_requests']['during']} |",
            f"| p50 ms | {r['p50_ms']['alone']} | {r['p50_ms']['during']} |",
            f"| p99 ms | {r['p99_ms']['alone']} | {r['p99_ms']['during']} |",
            f"p99 during − alone: {r['p99_delta_ms']} ms (goal ≤ {GOAL_MS:.0f} ms: {status}); {r['big_prompts']} big "
            f"prompts of {r['big_prompt_bytes'] / 1e6:.1f} MB, statuses {r['big_statuses']}, "
            f"median {r['big_median_s']} s each",
        ]
    )

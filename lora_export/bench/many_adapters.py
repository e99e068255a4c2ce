"""Benchmark many adapters on one server (S-LoRA scale): `lora-export serve --adapter-dir` over N registered PEFT
adapters, an LRU of `--max-cpu-adapters` loaded ones, 32 closed-loop clients with the official `openai` package.

Its command line is `tools/bench_many_adapters.py`.

The folder: a GPT-2-small-shaped bank decoder (slots on `c_attn`, R = 16, gather formulation); N adapters
(default 1,000) with ranks drawn from 4..16 and random non-zero B, registered from one directory. Measured, in
one run on one server (loads interleave, so drift hits each):

- throughput (generated tokens/s over the wall time) with every request for one adapter, for an adapter drawn
  uniformly from the N, and drawn by Zipf (alpha = 1; a few hot adapters, a long tail);
- TTFT (streamed: first token at the client) p50/p99 per load, split into cold requests (the adapter is not in an
  LRU of `--max-cpu-adapters` simulated over the requests in send order: it had to be loaded) and warm ones;
- the replica's RSS after the one-adapter load (base: one adapter resident) and after the many-adapter loads, vs
  base + cache x the adapters' mean in-memory size;
- correctness: sampled requests' greedy tokens vs PEFT `generate` with that adapter on the same prompt.

Goals (issue 27): uniform / one adapter >= 0.80; Zipf / one adapter >= 0.90; RSS <= (base + cache x adapter
size) x 1.10; cold TTFT p99 / warm TTFT p99 <= 3; sampled rows token-exact.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_export.artifacts.decoder_folder import read_folder
from lora_export.bench.latency import percentile
from lora_export.bench.report import publish, run_machine
from lora_export.bench.serve import Server, replica_stats

TARGETS = ["c_attn"]
RANKS = (4, 16)


@dataclass
class ManyAdaptersOptions:
    workdir: Path = Path("/tmp/lora_export_bench_many")
    quick: bool = False  # tiny sample model, 40 adapters, few requests: checks the script runs
    adapters: int = 1000
    cache: int = 64  # --max-cpu-adapters
    per_batch: int | None = None  # --max-adapters-per-batch (None: the batch size)
    clients: int = 32
    requests: int = 4  # per client, per load
    new_tokens: int = 32
    prompt_len: int = 16
    check_rows: int = 6  # requests compared with PEFT
    port: int = 8766
    json: Path | None = None
    markdown: Path | None = None
    command: str = "python tools/bench_many_adapters.py"


def adapter_name(i: int) -> str:
    return f"a{i:04d}"


def prepare(workdir: Path, model: str, n: int, seed: int = 0) -> tuple[Path, Path, dict[str, int]]:
    """The bank folder (no adapter packed: slots on `c_attn`, R = 16) and `n` PEFT adapter directories under
    `workdir/adapters` (ranks 4..16, random non-zero B), made once per workdir; name -> rank."""
    from lora_export.adapters.peft_io import write_peft_adapter
    from lora_export.adapters.spec import LoraSpec
    from lora_export.adapters.synthetic import random_adapter
    from lora_export.export.decoder import export_decoder
    from lora_export.models import load_model

    loaded = load_model(model)
    ranks = np.random.default_rng(seed).integers(RANKS[0], RANKS[1] + 1, size=n)
    root = workdir / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    table = {}
    for i, r in enumerate(ranks.tolist()):
        name, path = adapter_name(i), root / adapter_name(i)
        table[name] = r
        if not (path / "adapter_config.json").exists():
            spec = LoraSpec(r=r, alpha=2.0 * r, target_modules=TARGETS)
            write_peft_adapter(random_adapter(loaded.module, spec, seed=1000 + i, name=name), path,
                               base_model=loaded.source)  # fmt: skip
    folder = workdir / "decoder"
    if not (folder / "model.onnx").exists():
        export_decoder(loaded, folder, layout="bank", targets=TARGETS, max_rank=RANKS[1], bank_formulation="gather")
    return folder, root, table


def adapter_bytes(ranks: dict[str, int], slots) -> float:
    """Mean fp32 bytes of one adapter's A `[in, r]` and B `[r, out]` over the folder's slots, in memory."""
    per_rank = sum(s.in_features + s.out_features for s in slots) * 4
    return float(np.mean([r * per_rank for r in ranks.values()]))


def draws(kind: str, n: int, count: int, seed: int) -> list[int]:
    """Adapter indices for `count` requests: all 0 (one), uniform over n, or Zipf (alpha = 1) over n."""
    rng = np.random.default_rng(seed)
    if kind == "one":
        return [0] * count
    if kind == "uniform":
        return rng.integers(0, n, size=count).tolist()
    weights = 1.0 / np.arange(1, n + 1)
    order = rng.permutation(n)  # the hot adapters are not simply the first names
    return order[rng.choice(n, size=count, p=weights / weights.sum())].tolist()


def lru_pass(names: list[str], cache: int, warm: set[str]) -> tuple[list[bool], set[str]]:
    """Whether each request (in send order) finds its adapter outside an LRU of `cache` entries (starting from the
    adapters in `warm`): the server had to load it; and the LRU's contents after the requests (the next load's
    `warm`)."""
    lru: OrderedDict[str, None] = OrderedDict((w, None) for w in warm)
    cold = []
    for name in names:
        cold.append(name not in lru)
        lru[name] = None
        lru.move_to_end(name)
        while len(lru) > cache:
            lru.popitem(last=False)
    return cold, set(lru)


async def load(url: str, names: list[str], prompts: list[list[int]], clients: int, new_tokens: int) -> dict:
    """`clients` closed-loop clients taking the requests (`names[i]`, `prompts[i]`) in order; streamed, so each
    request's TTFT is its first chunk. Returns throughput and per-request (index, ttft_ms, tokens)."""
    import openai

    queue = list(range(len(names)))
    sent: list[int] = []
    records: dict[int, dict] = {}

    async def client(api) -> None:
        while queue:
            i = queue.pop(0)
            sent.append(i)
            t0 = time.perf_counter()
            first, tokens = None, []
            stream = await api.completions.create(
                model=names[i], prompt=prompts[i], max_tokens=new_tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )  # fmt: skip
            async for chunk in stream:
                if first is None:
                    first = time.perf_counter()
                for choice in chunk.choices:
                    tokens.extend((choice.model_extra or {}).get("token_ids") or [])
            records[i] = {"ttft_ms": (first - t0) * 1e3, "ms": (time.perf_counter() - t0) * 1e3, "tokens": tokens}

    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800) as api:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(api) for _ in range(clients)))
        wall = time.perf_counter() - t0
    generated = len(names) * new_tokens
    return {"wall_s": wall, "tokens_per_s": generated / wall, "sent": sent, "records": records}


def _summary(kind: str, run: dict, names: list[str], cold: list[bool]) -> dict:
    recs = run["records"]
    ttft = {flag: [recs[i]["ttft_ms"] for i in range(len(names)) if cold[i] == flag] for flag in (True, False)}
    out = {
        "load": kind,
        "requests": len(names),
        "distinct_adapters": len(set(names)),
        "tokens_per_s": round(run["tokens_per_s"], 2),
        "wall_s": round(run["wall_s"], 2),
        "cold_requests": len(ttft[True]),
    }
    for flag, label in ((False, "warm"), (True, "cold")):
        if ttft[flag]:
            out[f"{label}_ttft_p50_ms"] = round(percentile(ttft[flag], 50), 1)
            out[f"{label}_ttft_p99_ms"] = round(percentile(ttft[flag], 99), 1)
    return out


def peft_tokens(model: str, adapter_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy PEFT `generate` with the adapter (the oracle for a served row)."""
    import torch
    from peft import PeftModel
    from transformers import GenerationConfig

    from lora_export.models import load_model

    base = load_model(model).materialized().module
    pm = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.tensor([prompt])
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt) :].tolist()


def run_many_adapters_bench(args: ManyAdaptersOptions) -> dict:
    """The whole benchmark (see the module docstring): the results, also written as JSON / markdown."""
    model = "sample:gpt2" if args.quick else "sample:gpt2-small"
    n = min(args.adapters, 40) if args.quick else args.adapters
    cache = min(args.cache, 8) if args.quick else args.cache  # quick: fewer than the adapters, so it evicts
    workdir = args.workdir / ("quick" if args.quick else "gpt2-small")
    folder, adapter_root, ranks = prepare(workdir, model, n)
    info = read_folder(folder)
    size = adapter_bytes(ranks, info.manifest.slots)
    vocab = info.facts.vocab_size
    rng = np.random.default_rng(1)
    count = args.clients * args.requests
    prompts = [rng.integers(1, vocab - 1, size=args.prompt_len).tolist() for _ in range(count)]
    extra = ["--adapter-dir", str(adapter_root), "--max-cpu-adapters", str(cache)]
    if args.per_batch:
        extra += ["--max-adapters-per-batch", str(args.per_batch)]
    load_at_start = os.getloadavg()
    results: dict = {
        "model": model, "adapters": n, "cache": cache, "clients": args.clients, "requests_per_load": count,
        "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "adapter_bytes_mean": round(size),
    }  # fmt: skip
    server = Server(folder, args.port, max_batch_size=args.clients, wait_ms=10.0, extra=extra,
                    warm_model=adapter_name(0))  # fmt: skip
    runs, rows = {}, []
    try:
        warm = {adapter_name(0)}
        plan = {kind: [adapter_name(i) for i in draws(kind, n, count, seed=7)] for kind in ("one", "uniform", "zipf")}
        for kind in ("one", "uniform", "zipf", "one"):  # "one" again last: drift shows as its two runs differing
            names = plan[kind]
            run = asyncio.run(load(server.url, names, prompts, args.clients, args.new_tokens))
            order = run["sent"]
            cold_in_order, warm = lru_pass([names[i] for i in order], cache, warm)
            cold = [False] * len(names)
            for i, flag in zip(order, cold_in_order):
                cold[i] = flag
            stats = replica_stats(server.url)
            summary = _summary(kind, run, names, cold)
            summary["rss_mb"] = round((stats.get("rss_bytes") or 0) / 2**20, 1)
            summary["adapters_resident"] = len(stats["adapters_resident"])
            summary["adapter_evictions"] = stats["adapter_evictions"]
            runs.setdefault(kind, []).append(summary)
            print(json.dumps(summary), flush=True)
            if kind == "uniform":
                pick = np.random.default_rng(3).choice(len(names), size=min(args.check_rows, len(names)), replace=False)
                rows = [(names[i], prompts[i], run["records"][i]["tokens"]) for i in pick.tolist()]
    finally:
        server.close()
    checks = [peft_tokens(model, adapter_root / name, prompt, args.new_tokens) == got for name, prompt, got in rows]
    one = float(np.median([r["tokens_per_s"] for r in runs["one"]]))
    base_rss = runs["one"][0]["rss_mb"]
    peak_rss = max(r["rss_mb"] for k in ("uniform", "zipf") for r in runs[k])
    bound = (base_rss + cache * size / 2**20) * 1.10
    uniform, zipf = runs["uniform"][0], runs["zipf"][0]
    warm_p99 = max(uniform.get("warm_ttft_p99_ms", 0), zipf.get("warm_ttft_p99_ms", 0)) or None
    cold_p99 = max(uniform.get("cold_ttft_p99_ms", 0), zipf.get("cold_ttft_p99_ms", 0)) or None
    results.update(
        runs=runs,
        uniform_over_one=round(uniform["tokens_per_s"] / one, 3),
        zipf_over_one=round(zipf["tokens_per_s"] / one, 3),
        rss_base_mb=base_rss,
        rss_peak_mb=peak_rss,
        rss_bound_mb=round(bound, 1),
        cold_over_warm_ttft_p99=round(cold_p99 / warm_p99, 2) if cold_p99 and warm_p99 else None,
        peft_rows_checked=len(checks),
        peft_rows_equal=sum(checks),
        machine=run_machine(load_at_start),
    )
    publish(results, args.json, args.markdown, lambda r: markdown(r, args.command))
    return results


def markdown(results: dict, command: str) -> str:
    """The many-adapters section of BENCHMARKS.md."""

    def status(ok: bool) -> str:
        return "met" if ok else "**NOT met**"

    r = results
    ratio = r["cold_over_warm_ttft_p99"]
    lines = [
        "## Many adapters (`serve --adapter-dir`)",
        "",
        f"Written by `tools/bench_many_adapters.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Command: `{command}`.",
        "",
        f"{r['model']} bank folder (`c_attn` slots, R = 16, gather), {r['adapters']} registered adapters (ranks "
        f"4..16, random non-zero B, {r['adapter_bytes_mean'] / 2**20:.2f} MiB each on average), "
        f"`--max-cpu-adapters {r['cache']}`, {r['clients']} closed-loop `openai` clients, {r['requests_per_load']} "
        f"requests per load, {r['prompt_len']}-token prompts, {r['new_tokens']} new tokens, greedy, streamed. "
        f"{r['machine']['cores']} cores; load average {r['machine']['load_average_at_start'][0]:.1f} at the start, "
        f"{r['machine']['load_average_at_end'][0]:.1f} at the end.",
        "",
        "| goal | measured | status |",
        "|---|---|---|",
        f"| throughput uniform / one adapter >= 0.80 | {r['uniform_over_one']:.2f} | "
        f"{status(r['uniform_over_one'] >= 0.8)} |",
        f"| throughput Zipf / one adapter >= 0.90 | {r['zipf_over_one']:.2f} | {status(r['zipf_over_one'] >= 0.9)} |",
        f"| replica RSS <= (base + {r['cache']} x adapter) x 1.10 | {r['rss_peak_mb']:.0f} MiB (base "
        f"{r['rss_base_mb']:.0f}, bound {r['rss_bound_mb']:.0f}) | {status(r['rss_peak_mb'] <= r['rss_bound_mb'])} |",
        f"| cold TTFT p99 / warm TTFT p99 <= 3 | {ratio if ratio is not None else 'n/a'} | "
        f"{status(ratio is not None and ratio <= 3)} |",
        f"| sampled rows == PEFT greedy | {r['peft_rows_equal']}/{r['peft_rows_checked']} | "
        f"{status(r['peft_rows_equal'] == r['peft_rows_checked'] > 0)} |",
        "",
        "| load | distinct adapters | tokens/s | warm TTFT p50 / p99 ms | cold requests | cold TTFT p50 / p99 ms | "
        "resident | evictions | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("one", "uniform", "zipf"):
        for s in r["runs"][kind]:
            lines.append(
                f"| {kind} | {s['distinct_adapters']} | {s['tokens_per_s']:.1f} | "
                f"{s.get('warm_ttft_p50_ms', '-')} / {s.get('warm_ttft_p99_ms', '-')} | {s['cold_requests']} | "
                f"{s.get('cold_ttft_p50_ms', '-')} / {s.get('cold_ttft_p99_ms', '-')} | "
                f"{s['adapters_resident']} | {s['adapter_evictions']} | {s['rss_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"

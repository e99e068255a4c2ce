"""Soak `lora-export serve`: minutes of closed-loop `openai` clients over mixed adapters, with bad requests and
clients that go away mid-stream mixed in; then every sampled greedy reply is replayed alone and compared.

Its command line is `tools/soak_serve.py`.

The folder is the serving benchmark's (`bench.serve.prepare`: a bank folder with adapters adapter0..3). Each
client loops until the deadline: a bad request (`bad` of the time: an unknown model, a string temperature, an
unknown field, a negative `max_tokens`, a token id outside the vocabulary, malformed JSON), a stream it drops
after the first chunk (`disconnect` of the time), or a greedy completion (eos ignored, token ids returned) for
the base model or one of the adapters. Every 5 s the replica's `/stats` (RSS, open file descriptors) is read.

Goals (issue 26): 0 unexpected 5xx (every bad request a 4xx, every good one a 200); 0 cross-talk (the sampled
replies equal the same request sent alone afterwards); replica RSS growth <= 10 % from the end of the warm-up to
the end; no file-descriptor growth.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_export.bench.report import run_machine
from lora_export.bench.serve import ADAPTERS, Server, prepare, replica_stats

BAD_KINDS = ("unknown model", "string temperature", "unknown field", "negative max_tokens", "token id", "bad json")


@dataclass
class SoakOptions:
    workdir: Path = Path("/tmp/lora_export_soak")
    model: str = "sample:gpt2"
    seconds: float = 300.0
    warmup: float = 60.0  # RSS / fds are compared from here to the end
    clients: int = 64
    bad: float = 0.10
    disconnect: float = 0.05
    new_tokens: int = 16
    replay: int = 32  # sampled greedy replies replayed alone
    max_batch_size: int = 32
    port: int = 8767
    seed: int = 0
    json: Path | None = None


@dataclass
class Tally:
    good: int = 0
    bad: int = 0
    dropped: int = 0
    unexpected: list[str] = field(default_factory=list)  # what went wrong, one line each
    replies: list[tuple[str, int, list[int]]] = field(default_factory=list)  # (model, prompt index, tokens)
    samples: list[dict] = field(default_factory=list)  # /stats of the replica every 5 s, with the time


async def _client(c: int, url: str, prompts, opts: SoakOptions, vocab: int, deadline: float, tally: Tally) -> None:
    import httpx2
    import openai

    rng = random.Random(opts.seed * 1000 + c)
    models = [None, *(f"adapter{i}" for i in range(ADAPTERS))]
    async with (
        openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300) as api,
        httpx2.AsyncClient(timeout=60) as raw,
    ):
        while time.monotonic() < deadline:
            roll = rng.random()
            model = models[rng.randrange(len(models))] or "decoder"
            i = rng.randrange(len(prompts))
            try:
                if roll < opts.bad:
                    await _bad(api, raw, url, rng.choice(BAD_KINDS), prompts[i], vocab, tally)
                elif roll < opts.bad + opts.disconnect:
                    stream = await api.completions.create(
                        model=model, prompt=prompts[i], max_tokens=opts.new_tokens, temperature=0, stream=True,
                        extra_body={"ignore_eos": True},
                    )  # fmt: skip
                    async for _ in stream:
                        break
                    await stream.close()
                    tally.dropped += 1
                else:
                    reply = await api.completions.create(
                        model=model, prompt=prompts[i], max_tokens=opts.new_tokens, temperature=0,
                        extra_body={"ignore_eos": True, "return_token_ids": True},
                    )  # fmt: skip
                    tokens = list(reply.choices[0].model_extra["token_ids"])
                    if len(tokens) != opts.new_tokens:
                        tally.unexpected.append(f"{model}: {len(tokens)} tokens, asked {opts.new_tokens}")
                    tally.replies.append((model, i, tokens))
                    tally.good += 1
            except openai.APIStatusError as e:
                tally.unexpected.append(f"{model}: {e.status_code} {str(e)[:120]}")
            except (openai.APIConnectionError, httpx2.HTTPError) as e:
                tally.unexpected.append(f"{model}: connection {type(e).__name__}")


async def _bad(api, raw, url: str, kind: str, prompt: list[int], vocab: int, tally: Tally) -> None:
    """One bad request of `kind`: it must get a 4xx, never a 5xx or a 200."""
    import openai

    if kind == "bad json":
        r = await raw.post(f"{url}/completions", content=b'{"model": "decoder", "prompt": [1, 2', timeout=60)
        status = r.status_code
    else:
        args = {"model": "decoder", "prompt": prompt, "max_tokens": 4}
        extra = {}
        if kind == "unknown model":
            args["model"] = "no-such-adapter"
        elif kind == "string temperature":
            extra["temperature"] = "hot"
        elif kind == "unknown field":
            extra["frobnicate"] = 1
        elif kind == "negative max_tokens":
            args["max_tokens"] = -1
        else:
            args["prompt"] = [vocab + 7]
        try:
            await api.completions.create(**args, extra_body=extra)
            status = 200
        except openai.APIStatusError as e:
            status = e.status_code
    if 400 <= status < 500:
        tally.bad += 1
    else:
        tally.unexpected.append(f"bad request ({kind}): {status}")


async def _monitor(url: str, deadline: float, tally: Tally) -> None:
    import httpx2

    t0 = time.monotonic()
    async with httpx2.AsyncClient(timeout=60) as client:
        while time.monotonic() < deadline:
            stats = (await client.get(url.removesuffix("/v1") + "/stats")).json()["replicas"]
            replica = next(iter(stats.values()))
            tally.samples.append(
                {"t": round(time.monotonic() - t0, 1), "rss_bytes": replica["rss_bytes"], "fds": replica["open_fds"]}
            )
            await asyncio.sleep(5)


async def _soak(url: str, prompts, opts: SoakOptions, vocab: int) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + opts.seconds
    monitor = asyncio.create_task(_monitor(url, deadline, tally))
    await asyncio.gather(*(_client(c, url, prompts, opts, vocab, deadline, tally) for c in range(opts.clients)))
    await monitor
    return tally


async def _replay(url: str, prompts, picks: list[tuple[str, int, list[int]]], new_tokens: int) -> list[bool]:
    import openai

    out = []
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300) as api:
        for model, i, tokens in picks:  # one at a time: each request alone on the server
            reply = await api.completions.create(
                model=model, prompt=prompts[i], max_tokens=new_tokens, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )  # fmt: skip
            out.append(list(reply.choices[0].model_extra["token_ids"]) == tokens)
    return out


def run_soak(opts: SoakOptions) -> dict:
    """The soak (see the module docstring): its results, printed as a table and written as JSON."""
    workdir = opts.workdir / opts.model.replace(":", "_")
    workdir.mkdir(parents=True, exist_ok=True)
    folder, prompts = prepare(workdir, opts.model, 16, 64, seed=opts.seed)
    vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
    load_at_start = os.getloadavg()
    server = Server(folder, opts.port, opts.max_batch_size, wait_ms=10.0)
    try:
        t0 = time.perf_counter()
        tally = asyncio.run(_soak(server.url, prompts, opts, vocab))
        wall = time.perf_counter() - t0
        picks = random.Random(opts.seed).sample(tally.replies, min(opts.replay, len(tally.replies)))
        same = asyncio.run(_replay(server.url, prompts, picks, opts.new_tokens))
        final = replica_stats(server.url)
    finally:
        server.close()
    after = [s for s in tally.samples if s["t"] >= opts.warmup] or tally.samples[-1:]
    start, end = after[0], {"rss_bytes": final["rss_bytes"], "fds": final["open_fds"]}
    growth = end["rss_bytes"] / start["rss_bytes"] - 1 if start["rss_bytes"] else None
    results = {
        "model": opts.model,
        "seconds": round(wall, 1),
        "clients": opts.clients,
        "requests": {"good": tally.good, "bad (4xx as expected)": tally.bad, "dropped streams": tally.dropped},
        "tokens_per_s": round(tally.good * opts.new_tokens / wall, 1),
        "unexpected": len(tally.unexpected),
        "unexpected_examples": tally.unexpected[:10],
        "replayed": len(same),
        "cross_talk": same.count(False),
        "rss_mb_after_warmup": round(start["rss_bytes"] / 2**20, 1),
        "rss_mb_end": round(end["rss_bytes"] / 2**20, 1),
        "rss_growth": round(growth, 4) if growth is not None else None,
        "fds_after_warmup": start["fds"],
        "fds_end": end["fds"],
        "samples": tally.samples,
        "machine": run_machine(load_at_start),
    }
    results["passed"] = (
        results["unexpected"] == 0
        and results["cross_talk"] == 0
        and results["replayed"] > 0
        and growth is not None
        and growth <= 0.10
        and end["fds"] <= start["fds"]
    )
    for line in table(results):
        print(line)
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))
    return results


def table(r: dict) -> list[str]:
    def status(ok: bool) -> str:
        return "met" if ok else "NOT met"

    growth = r["rss_growth"]
    return [
        f"soak: {r['model']}, {r['clients']} clients, {r['seconds']} s; requests {r['requests']}, "
        f"{r['tokens_per_s']} tokens/s",
        "| goal | measured | status |",
        "|---|---|---|",
        f"| 0 unexpected 5xx / wrong statuses | {r['unexpected']} | {status(r['unexpected'] == 0)} |",
        f"| 0 cross-talk (replayed alone) | {r['cross_talk']} of {r['replayed']} | "
        f"{status(r['cross_talk'] == 0 and r['replayed'] > 0)} |",
        f"| replica RSS growth <= 10 % after warm-up | {r['rss_mb_after_warmup']} -> {r['rss_mb_end']} MiB "
        f"({growth:+.1%}) | {status(growth is not None and growth <= 0.10)} |",
        f"| no file-descriptor growth | {r['fds_after_warmup']} -> {r['fds_end']} | "
        f"{status(r['fds_end'] <= r['fds_after_warmup'])} |",
    ]

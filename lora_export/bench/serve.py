"""Benchmark `lora-export serve`: GPT-2 small shape decoder folder (bank layout, 4 random adapters), 64 new
tokens per request, greedy, clients with the official `openai` package.

Its command line is `tools/bench_serve.py`.

Measured, in one run:
- throughput (generated tokens/s over the wall time) and p50/p99 request latency for 1, 8 and 32 concurrent
  clients spread over the 4 adapters, on the batched server (--max-batch-size 32) and on the same server with
  --max-batch-size 1 (requests served one at a time);
- at 1 client, the server's request latency vs the in-process generator on the same folder (same prompts,
  same adapters; timed interleaved with the server requests, so machine drift hits both).

Goals: at 32 clients, batched >= 3x the throughput of --max-batch-size 1; at 1 client, server latency
<= 1.2x the in-process generator.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import lora_export
from lora_export.bench.latency import Candidate, measure, percentile
from lora_export.bench.report import publish, run_machine

ROOT = Path(lora_export.__file__).resolve().parents[1]  # on the servers' and the worker's PYTHONPATH

ADAPTERS = 4


def prepare(workdir: Path, model: str, prompt_len: int, n_prompts: int, seed: int = 0) -> tuple[Path, list]:
    """The decoder folder (bank, adapters adapter0..3 packed in it) and the prompts (random token ids), built
    once per workdir."""
    folder = workdir / "decoder"
    if not (folder / "model.onnx").exists():
        from lora_export.adapters.peft_io import read_adapter, write_peft_adapter
        from lora_export.adapters.spec import LoraSpec, default_targets
        from lora_export.adapters.synthetic import random_adapter
        from lora_export.export.decoder import export_decoder
        from lora_export.models import load_model

        loaded = load_model(model)
        paths = [workdir / f"adapter{i}" for i in range(ADAPTERS)]
        spec = LoraSpec(r=8, alpha=16.0, target_modules=list(default_targets(loaded.arch, module=loaded.module)))
        for i, path in enumerate(paths):
            if not path.exists():  # as `lora-export make-adapter MODEL path --r 8 --seed 100+i`
                write_peft_adapter(random_adapter(loaded.module, spec, seed=100 + i, name=path.name), path,
                                   base_model=loaded.source)  # fmt: skip
        export_decoder(loaded, folder, adapters=[read_adapter(p) for p in paths], layout="bank", max_rank=8)
    vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, vocab - 1, size=prompt_len).tolist() for _ in range(n_prompts)]
    return folder, prompts


class InProcess:
    """The baseline for the server's 1-client latency: the generator opened exactly as a server replica opens
    it, in a worker process of its own session (the server's processes run in sessions of their own too; with
    the kernel's per-session CPU shares, a generator inside this process would get a smaller share of a busy
    machine than the replica and the comparison would flatter the server). Requests go over a pipe."""

    def __init__(self, folder: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-c", "import sys; from lora_export.bench.serve import worker; worker(sys.argv[1])"]
        cmd.append(str(folder))
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, start_new_session=True
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def generate(self, prompt: list[int], adapter: str, max_new_tokens: int) -> list[int]:
        self.proc.stdin.write(json.dumps([prompt, adapter, max_new_tokens]) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def worker(folder: str) -> None:
    """The in-process baseline's worker: generate for JSON lines [prompt, adapter, max_new_tokens] on stdin,
    tokens on stdout."""
    from lora_export.serving.model import folder_adapters, open_served_model

    model, _ = open_served_model(folder)
    generator = model.generator
    for name, path in folder_adapters(folder).items():
        generator.load_adapter(name, path)
    print("ready", flush=True)
    for line in sys.stdin:
        prompt, adapter, n = json.loads(line)
        result = generator.generate([prompt], adapter=adapter, max_new_tokens=n, ignore_eos=True)
        print(json.dumps(result.tokens[0]), flush=True)


class Server:
    """`lora-export serve` in a subprocess; `close()` is Ctrl-C and waits for it to exit."""

    def __init__(
        self,
        folder: Path,
        port: int,
        max_batch_size: int,
        wait_ms: float,
        extra: list[str] = (),
        warm_model: str = "adapter0",
    ):
        from lora_export.serving import wait_ready

        args = [sys.executable, "-m", "lora_export", "serve", str(folder), "--port", str(port)]
        args += ["--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(wait_ms), *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = open(folder.parent / f"serve_b{max_batch_size}.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}/v1"
        try:
            wait_ready(self.url, timeout=300)
            # wait_ready sees the ingress; the first request also waits for the engine replica to be up
            asyncio.run(_one(self.url, warm_model, [1, 2, 3], 2))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()


async def _one(url: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        reply = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return time.perf_counter() - t0, reply.usage.completion_tokens


async def clients(url: str, concurrency: int, per_client: int, prompts, new_tokens: int) -> dict:
    """`concurrency` clients, each sending `per_client` requests back to back (closed loop), adapters in turn."""
    import openai

    latencies: list[float] = []
    tokens = 0

    async def client(c: int, api) -> None:
        nonlocal tokens
        for k in range(per_client):
            i = c * per_client + k
            t0 = time.perf_counter()
            reply = await api.completions.create(
                model=f"adapter{i % ADAPTERS}", prompt=prompts[i % len(prompts)], max_tokens=new_tokens,
                temperature=0, extra_body={"ignore_eos": True},
            )  # fmt: skip
            latencies.append(time.perf_counter() - t0)
            tokens += reply.usage.completion_tokens

    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800) as api:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, api) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = [x * 1000 for x in latencies]
    return {
        "clients": concurrency,
        "requests": len(ms),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(percentile(ms, 99), 1),
    }


def server_stats(url: str) -> dict:
    """The server's counters summed over its replicas, as `/stats` reports them."""
    return _stats(url)["total"]


def replica_stats(url: str) -> dict:
    """The (first) replica's own counters and process figures, as `/stats` reports them."""
    return next(iter(_stats(url)["replicas"].values()))


def _stats(url: str) -> dict:
    import httpx2

    return httpx2.get(url.removesuffix("/v1") + "/stats", timeout=60).json()


@dataclass
class ServeBenchOptions:
    workdir: Path = Path("/tmp/lora_export_bench_serve")
    quick: bool = False  # tiny sample model, few requests
    new_tokens: int = 64
    prompt_len: int = 32
    concurrency: str = "1,8,32"
    per_client: str = "4,2,2"  # requests each client sends, per concurrency level
    latency_iters: int = 8  # 1-client requests timed vs in-process
    port: int = 8765
    json: Path | None = None
    markdown: Path | None = None  # write the BENCHMARKS.md serving section here
    command: str = "python tools/bench_serve.py"  # recorded in the markdown


def run_serve_bench(args: ServeBenchOptions) -> dict:
    """The whole benchmark (see the module docstring): the results, also written as JSON / markdown."""
    model = "sample:gpt2" if args.quick else "sample:gpt2-small"
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = args.workdir / ("quick" if args.quick else "gpt2-small")
    workdir.mkdir(parents=True, exist_ok=True)
    folder, prompts = prepare(workdir, model, args.prompt_len, 64)
    n = args.new_tokens
    counts = [int(x) for x in args.per_client.split(",")]
    per_client = dict(zip(levels, counts))  # closed loop: each client sends these back to back
    load_at_start = os.getloadavg()
    results: dict = {"model": model, "new_tokens": n, "prompt_len": args.prompt_len, "runs": {}}

    for batch in (32, 1):
        server = Server(folder, args.port, batch, wait_ms=10.0)
        try:
            if batch == 32:
                results["latency_1_client"] = _latency_vs_inprocess(server, folder, prompts, n, args.latency_iters)
            runs = []
            for c in levels:
                before = server_stats(server.url)
                run = asyncio.run(clients(server.url, c, per_client[c], prompts, n))
                after = server_stats(server.url)
                steps = after["steps"] - before["steps"]
                run["mean_rows_per_step"] = round((after["row_steps"] - before["row_steps"]) / max(steps, 1), 2)
                run["mixed_adapter_steps"] = after["mixed_steps"] - before["mixed_steps"]
                runs.append(run)
                print(f"max-batch-size {batch:2d}  {json.dumps(run)}", flush=True)
            results["runs"][f"max_batch_size_{batch}"] = runs
        finally:
            server.close()

    top = max(levels)
    batched = next(r for r in results["runs"]["max_batch_size_32"] if r["clients"] == top)
    single = next(r for r in results["runs"]["max_batch_size_1"] if r["clients"] == top)
    results["throughput_ratio_at_max_clients"] = round(batched["tokens_per_s"] / single["tokens_per_s"], 2)
    results["machine"] = run_machine(load_at_start)
    publish(results, args.json, args.markdown, lambda r: markdown(r, args.command))
    return results


def markdown(results: dict, command: str) -> str:
    """The serving section of BENCHMARKS.md."""
    lat = results["latency_1_client"]
    top = max(r["clients"] for r in results["runs"]["max_batch_size_32"])
    ratio = results["throughput_ratio_at_max_clients"]
    load = results["machine"]
    latency_status = "met" if max(lat["ratio_p50"], lat["server_over_engine"]) <= 1.2 else "NOT met"
    lines = [
        "## Serving (`lora-export serve`)",
        "",
        f"Written by `tools/bench_serve.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Command: `{command}`.",
        "",
        f"{results['model']} decoder folder (bank layout, 4 random adapters r=8), {results['prompt_len']}-token "
        f"prompts, {results['new_tokens']} new tokens per request, greedy; clients are the official `openai` "
        "package (closed loop: each client sends its next request when the last one returns), adapters in "
        "turn; one engine replica; fp32, ONNX Runtime CPU. "
        f"{load['cores']} cores, shared: load average {load['load_average_at_start'][0]:.1f} at the start, "
        f"{load['load_average_at_end'][0]:.1f} at the end.",
        "",
        "| goal | measured | status |",
        "|---|---|---|",
        f"| {top} clients: batched / `--max-batch-size 1` throughput >= 3x | {ratio:.2f}x | "
        f"{'met' if ratio >= 3 else 'NOT met'} |",
        f"| 1 client: server latency <= 1.2x the in-process generator | {lat['ratio_p50']:.2f}x (p50 "
        f"{lat['server_p50_ms']:.0f} / {lat['in_process_p50_ms']:.0f} ms); the server's own overhead: "
        f"{lat['server_over_engine']:.3f}x ({lat['server_overhead_ms']:.0f} ms over "
        f"{lat['server_engine_mean_ms']:.0f} ms inside the replica) | {latency_status} |",
        "",
        "| server | clients | requests | tokens/s | p50 ms | p99 ms | rows per step | steps mixing adapters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label in (("max_batch_size_32", "batched (32)"), ("max_batch_size_1", "--max-batch-size 1")):
        for r in results["runs"][key]:
            lines.append(
                f"| {label} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['p50_ms']:.0f} | "
                f"{r['p99_ms']:.0f} | {r['mean_rows_per_step']:.2f} | {r['mixed_adapter_steps']} |"
            )
    return "\n".join(lines) + "\n"


def _latency_vs_inprocess(server: Server, folder: Path, prompts, n: int, latency_iters: int) -> dict:
    """1 client: server request latency vs the in-process generator, interleaved (same prompts, adapters); and
    the client's latency vs the time the request spent inside the replica (the server's own overhead: HTTP,
    proxy, ingress, Ray calls, the batch window), which does not depend on how the machine shares its CPUs."""
    import openai

    local = InProcess(folder)
    api = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)  # one connection, reused
    jobs = [(f"adapter{i % ADAPTERS}", prompts[i]) for i in range(latency_iters)]
    state = {"server": 0, "local": 0}

    def via_server():
        model, prompt = jobs[state["server"] % len(jobs)]
        state["server"] += 1
        reply = api.completions.create(
            model=model, prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.usage.completion_tokens == n

    def in_process():
        model, prompt = jobs[state["local"] % len(jobs)]
        state["local"] += 1
        assert len(local.generate(prompt, model, n)) == n

    via_server(), in_process()  # warm-up, outside the server's counters below
    before = server_stats(server.url)
    m = measure(
        [Candidate.from_callable("server", via_server), Candidate.from_callable("in-process", in_process)],
        iters=latency_iters,
        warmup=0,
    )
    after = server_stats(server.url)
    api.close()
    local.close()
    # inside the replica: submit -> finish of each request (the generator's work, as the scheduler ran it)
    engine_ms = (after["request_ms"] - before["request_ms"]) / max(after["finished"] - before["finished"], 1)
    stats = m.by_name()
    r = m.ratio("server", "in-process")
    out = {
        "server_p50_ms": round(stats["server"].p50, 1),
        "server_p99_ms": round(stats["server"].p99, 1),
        "in_process_p50_ms": round(stats["in-process"].p50, 1),
        "in_process_p99_ms": round(stats["in-process"].p99, 1),
        "ratio_p50": round(r.value, 3),
        "ratio_paired": round(r.paired, 3) if r.paired is not None else None,
        "server_engine_mean_ms": round(engine_ms, 1),
        "server_mean_ms": round(stats["server"].mean, 1),
        "server_overhead_ms": round(stats["server"].mean - engine_ms, 1),
        "server_over_engine": round(stats["server"].mean / engine_ms, 3),
    }
    print(f"1 client, server vs in-process: {json.dumps(out)}", flush=True)
    return out

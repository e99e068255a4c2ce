"""Generation benchmark: time to first token and ms/token of decoder folders, interleaved in one process.

Part of the reference suite (`lora_export.bench.suite`, which exports the folders and adds these goals to
BENCHMARKS.md); run alone:

    python tools/bench_generation.py                         # GPT-2 small shape, 32-token prompt, 128 new tokens
    python tools/bench_generation.py --quick                 # the tiny sample: checks it runs

Candidates, each one whole greedy generation per call (eos ignored, so every call makes the same number of
tokens), timed together by `lora_export.bench.latency.measure` with per-token marks (`StepTimes`):

- batch 1: PyTorch `generate` with its KV cache; our merged decoder (IO binding, and plain numpy feeds for
  contrast); our inputs-layout decoder with an adapter; ONNX Runtime GenAI on the merged folder. The old path
  (the full-sequence graph re-run on the whole sequence for every token) is the contrast, timed apart with
  fewer rounds (it is several times slower).
- batch 4: the bank decoder with four adapters (one per row) vs the inputs decoder with one adapter.

ONNX Runtime sessions (ours and GenAI's) run with intra-op spinning off, as every timing in this project.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_export.bench.goals import log


@dataclass
class GenerationBench:
    """What the generation group measured: latency rows, goal tuples for the suite, notes."""

    rows: list[dict] = field(default_factory=list)  # group, name, p50, p90, ...
    goals: list[dict] = field(default_factory=list)  # metric, goal, measured, unit, limit, detail
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def export_folders(loaded, adapters, work: Path, *, reuse: bool = False) -> dict[str, Path]:
    """merged (adapter 0 folded), inputs and bank (all adapters) decoder folders, plus the full-sequence graph;
    `reuse` keeps folders already in `work` (a previous run with the same model and adapters)."""
    from lora_export.export.decoder import export_decoder
    from lora_export.export.merged import export_merged

    out = {}
    for layout in ("merged", "inputs", "bank"):
        folder = work / f"decoder_{layout}"
        if reuse and (folder / "genai_config.json").is_file():
            out[layout] = folder
            continue
        log(f"export-decoder --layout {layout}")
        ads = adapters[:1] if layout == "merged" else adapters
        out[layout] = export_decoder(loaded, work / f"decoder_{layout}", adapters=ads, layout=layout, force=True).path
    full = work / "merged.onnx"
    if not full.exists():
        log("merge-and-export (the full-sequence graph of the old path)")
        export_merged(loaded, adapters[0], full, force=True)
    out["full"] = full
    return out


def genai_model(folder: Path, threads: int | None):
    """ONNX Runtime GenAI's model of `folder`, intra-op spinning off (`threads`: intra-op threads, None: GenAI's)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    options: dict[str, Any] = {"session.intra_op.allow_spinning": "0"}
    if threads:
        options["intra_op_num_threads"] = threads
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def measure_generation(
    folders: dict[str, Path],
    loaded,
    adapter_names: list[str],
    *,
    prompt_len: int = 32,
    new_tokens: int = 128,
    rounds: int = 5,
    old_rounds: int | None = None,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
) -> GenerationBench:
    import torch
    from transformers import GenerationConfig

    from lora_export.backends.onnxrt import open_session
    from lora_export.bench.latency import Candidate, StepTimes, measure, summarize
    from lora_export.contract import ATTENTION_MASK, INPUT_IDS, LOGITS
    from lora_export.runtime import Generator

    bench = GenerationBench()
    vocab = loaded.module.config.vocab_size
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, size=prompt_len).tolist()
    prompts4 = [rng.integers(0, vocab, size=prompt_len).tolist() for _ in range(4)]
    x = adapter_names[0]
    rows4 = [adapter_names[i % len(adapter_names)] for i in range(4)]
    made: dict[str, list[int]] = {}

    def ours(label, gen, prompts, **kw):
        times = StepTimes()

        def call(_h):
            times.start()
            tokens = []
            for event in gen.stream(prompts, max_new_tokens=new_tokens, ignore_eos=True, **kw):
                if event.row == 0:
                    times.mark()
                    tokens.append(event.token)
            made[label] = tokens

        return call, times

    gens = {
        "merged": Generator(folders["merged"], threads=threads, spinning=False),
        "merged, plain feeds": Generator(folders["merged"], threads=threads, spinning=False, io_binding=False),
        "inputs": Generator(folders["inputs"], threads=threads, spinning=False),
        "bank": Generator(folders["bank"], threads=threads, spinning=False),
    }
    # -- PyTorch generate with its KV cache (the model with adapter x merged, as the merged folder) --------------
    torch_model = loaded.copy().module
    from lora_export.adapters import read_adapter
    from lora_export.adapters.inject import merge_adapter

    merge_adapter(torch_model, read_adapter(folders["inputs"] / "adapters" / f"{x}.onnx_adapter"))
    torch_model.config.use_cache = True
    torch_times = StepTimes()

    class _Streamer:  # transformers calls put(prompt) first, then put(token) for every new token
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                torch_times.mark()

        def end(self):
            pass

    gen_config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True
    )
    ids = torch.tensor([prompt])

    def torch_call(_h):
        torch_times.start()
        with torch.no_grad():
            out = torch_model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_config, streamer=_Streamer()
            )
        made["torch"] = out[0, prompt_len:].tolist()

    # -- ONNX Runtime GenAI on the merged folder -------------------------------------------------------------------
    import onnxruntime_genai as og

    og_model = genai_model(folders["merged"], threads)
    genai_times = StepTimes()

    def genai_call(_h):
        genai_times.start()
        params = og.GeneratorParams(og_model)
        params.set_search_options(max_length=prompt_len + new_tokens, do_sample=False)
        generator = og.Generator(og_model, params)
        generator.append_tokens(np.array([prompt], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            genai_times.mark()
        made["genai"] = [int(t) for t in generator.get_sequence(0)][prompt_len:]

    # -- the old path: the full-sequence graph on the whole sequence for every token -------------------------------
    # (merge-and-export's graph; without one, the merged decoder from an empty cache every time, the same work)
    old_times = StepTimes()
    if "full" in folders:
        full = open_session(folders["full"], threads=threads, spinning=False)
        full_inputs = {i.name for i in full.get_inputs()}

        def full_logits(seq):
            feeds = {INPUT_IDS: np.array([seq], dtype=np.int64), ATTENTION_MASK: np.ones((1, len(seq)), np.int64)}
            return full.run([LOGITS], {k: v for k, v in feeds.items() if k in full_inputs})[0][0, -1]
    else:

        def full_logits(seq):
            return gens["merged"].prefill([seq]).logits[0]

    def old_call(_h):
        old_times.start()
        seq = list(prompt)
        for _ in range(new_tokens):
            seq.append(int(np.argmax(full_logits(seq))))
            old_times.mark()
        made["old"] = seq[prompt_len:]

    calls = {
        "torch/generate (KV cache)": (torch_call, torch_times),
        "ort/merged decoder": ours("merged decoder", gens["merged"], prompt),
        "ort/merged decoder, plain feeds": ours("plain feeds", gens["merged, plain feeds"], prompt),
        "ort/inputs decoder + adapter": ours("inputs decoder + adapter", gens["inputs"], prompt, adapter=x),
        "genai/merged folder": (genai_call, genai_times),
    }
    old_path = {"ort/old path: full graph per token": (old_call, old_times)}  # slow: a contrast, fewer rounds
    batch4 = {
        "ort/bank decoder, 4 adapters (b4)": ours("bank b4", gens["bank"], prompts4, adapters=rows4),
        "ort/inputs decoder, 1 adapter (b4)": ours("inputs b4", gens["inputs"], prompts4, adapter=x),
    }
    results = {}
    old_rounds = old_rounds if old_rounds is not None else max(1, rounds // 2)
    groups = (
        (f"generation b1, prompt {prompt_len}, {new_tokens} new", calls, rounds),
        (f"generation b1, prompt {prompt_len}, {new_tokens} new (old path)", old_path, old_rounds),
        (f"generation b4, prompt {prompt_len}, {new_tokens} new", batch4, rounds),
    )
    for group, table, n in groups:
        log(f"{group}: {len(table)} candidate(s), {n} interleaved rounds")
        cands = [Candidate.from_callable(name, (lambda f=f: f(None))) for name, (f, _) in table.items()]
        m = measure(cands, warmup=warmup, iters=n, seed=9)
        for name, (_, times) in table.items():
            firsts, steps, medians = times.timed(warmup)
            ttft, per_token = summarize(f"{name} ttft", firsts), summarize(f"{name} ms/token", steps)
            results[name] = (ttft, per_token, medians)
            total = m.by_name()[name]
            bench.rows.append({"group": group, **ttft.to_dict(samples=False)})
            bench.rows.append({"group": group, **per_token.to_dict(samples=False)})
            bench.rows.append({"group": group, **total.to_dict(samples=False), "name": f"{name} whole generation"})
    for g in gens.values():
        g.close()

    def per_token_ratio(num: str, den: str) -> tuple[float, str]:
        a, b = results[num][1], results[den][1]
        paired = [x / y for x, y in zip(results[num][2], results[den][2]) if y > 0]
        detail = (
            f"ms/token p50 {a.p50:.2f} / {b.p50:.2f} (p90 {a.p90:.2f} / {b.p90:.2f}); "
            f"TTFT p50 {results[num][0].p50:.1f} / {results[den][0].p50:.1f} ms; "
            f"paired {float(np.median(paired)) if paired else float('nan'):.3f}"
        )
        return a.p50 / b.p50, detail

    def goal(metric, text, pair, limit=None):
        value, detail = per_token_ratio(*pair)
        bench.goals.append(dict(metric=metric, goal=text, measured=value, unit="x", limit=limit, detail=detail))

    goal("merged decoder / PyTorch generate (KV cache), ms/token", "<= 0.65",
         ("ort/merged decoder", "torch/generate (KV cache)"), 0.65)  # fmt: skip
    goal("inputs decoder + adapter / merged decoder, ms/token", "<= 1.05",
         ("ort/inputs decoder + adapter", "ort/merged decoder"), 1.05)  # fmt: skip
    goal("bank b4 (4 adapters) / inputs decoder b4 (1 adapter), ms/token", "<= 1.15",
         ("ort/bank decoder, 4 adapters (b4)", "ort/inputs decoder, 1 adapter (b4)"), 1.15)  # fmt: skip
    goal("our generator / ONNX Runtime GenAI, same folder, ms/token", "<= 1.10",
         ("ort/merged decoder", "genai/merged folder"), 1.10)  # fmt: skip
    goal("plain numpy feeds / IO binding (KV as OrtValues), ms/token", "reported",
         ("ort/merged decoder, plain feeds", "ort/merged decoder"))  # fmt: skip
    goal("old path (full graph per token) / merged decoder, ms/token", "reported (contrast)",
         ("ort/old path: full graph per token", "ort/merged decoder"))  # fmt: skip
    agree = {k: made[k] == made.get("torch") for k in ("merged decoder", "plain feeds", "inputs decoder + adapter",
                                                     "genai", "old") if k in made}  # fmt: skip
    bench.notes.append(
        "generation: greedy tokens identical to PyTorch generate's for "
        + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in agree.items())
        + f" ({new_tokens} tokens, batch 1)"
    )
    bench.settings = {
        "prompt": prompt_len,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "old_path_rounds": old_rounds,
        "warmup": warmup,
        "threads": threads or "default",
    }
    return bench


def run_generation_bench(
    *,
    quick: bool = False,
    rounds: int | None = None,
    old_rounds: int | None = None,
    threads: int | None = None,
    workdir: str | Path | None = None,
) -> GenerationBench:
    """The standalone run of `tools/bench_generation.py`: four random adapters (r=8 on c_attn), the folders
    (reused from `workdir` when they are there), then `measure_generation`."""
    from lora_export.adapters.spec import LoraSpec
    from lora_export.adapters.synthetic import random_adapter
    from lora_export.bench.latency import set_threads
    from lora_export.models import load_model

    set_threads(threads)  # PyTorch's intra-op threads, as ONNX Runtime's
    loaded = load_model("sample:gpt2" if quick else "sample:gpt2-small")
    spec = LoraSpec(r=8, alpha=16, target_modules=["c_attn"])
    adapters = [random_adapter(loaded.module, spec, seed=i, name=f"adapter{i}") for i in range(4)]
    work = Path(workdir or tempfile.mkdtemp(prefix="lora_gen_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    folders = export_folders(loaded, adapters, work, reuse=workdir is not None)
    return measure_generation(
        folders,
        loaded,
        [a.name for a in adapters],
        prompt_len=8 if quick else 32,
        new_tokens=8 if quick else 128,
        rounds=rounds or (2 if quick else 5),
        old_rounds=old_rounds,
        threads=threads,
    )


def report_lines(bench: GenerationBench) -> list[str]:
    """The terminal report: one line per goal, one per latency row, then the notes."""
    lines = [f"{g['metric']}: {g['measured']:.3f}x (goal {g['goal']}) {g['detail']}" for g in bench.goals]
    lines += [
        f"{r['group']} | {r['name']} | p50 {r['p50']:.2f} ms | p90 {r['p90']:.2f} ms | n {r['iters']}"
        for r in bench.rows
    ]
    return lines + ["\n".join(bench.notes)]


def write_json(bench: GenerationBench, path: str | Path) -> None:
    Path(path).write_text(json.dumps(bench.__dict__, indent=2, default=str))

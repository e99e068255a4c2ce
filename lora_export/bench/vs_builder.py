"""Ours vs the ONNX Runtime GenAI model builder, on the same model, every folder run by ONNX Runtime GenAI.

    python tools/bench_vs_builder.py                 # SmolLM2-135M (30 layers, real weights), r=16 all-linear
    python tools/bench_vs_builder.py --quick         # its 4-layer cut, few tokens: checks it runs

Folders (build wall times are measured too): the builder's fp32 and int4 (`-p int4`, block 32, accuracy level
4), ours fused (`export-decoder --fused`) merged fp32, inputs fp32 + adapter, merged int4, inputs int4 + adapter,
and ours traced (unfused) merged fp32 for contrast; and our `Generator` (what `generate` / `serve` run) on the
fused inputs fp32 folder with its adapter, and on a fused bank int4 folder with 4 rows of 4 different adapters
against the builder's int4 folder at batch 4 under GenAI. Each candidate is one greedy generation per call (a
prompt, then `new_tokens` tokens, eos ignored: the next token is appended by hand, or GenAI's own greedy search
with `min_length` at batch 4), timed with per-token marks, all
candidates interleaved in one process (`bench.latency.measure`), intra-op spinning off, at 1 thread and at the
default. Prefill = the time to the first token's logits; decode = the median per-token time.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_export.bench.goals import log

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (ours, builder's) pairs and the decode goals for the ratio of their medians; prefill's goal is 1.00
PAIRS = [
    ("fused merged fp32", "builder fp32", 1.00),
    ("fused merged int4", "builder int4", 0.95),
    ("fused inputs int4 + adapter", "builder int4", 1.05),
    ("fused inputs fp32 + adapter", "builder fp32", None),
    ("traced merged fp32", "builder fp32", None),
    ("generator: fused inputs fp32 + adapter", "fused inputs fp32 + adapter", None),  # our runtime vs GenAI
    ("generator: fused inputs fp32 + adapter", "builder fp32", None),
    ("generator: fused bank int4, 4 rows x 4 adapters", "builder int4, batch 4", 1.15),
]
BATCH = 4  # rows of the bank candidate and of the builder's batch candidate
GENERATOR = "generator: "  # candidates run by our Generator on the folder named after the prefix


@dataclass
class VsBuilder:
    builds_s: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # setting, candidate, prefill ms, decode ms/token
    ratios: list[dict] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def random_adapter_dir(model_dir: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """A seeded all-linear PEFT adapter directory (non-zero B, alpha = 2r) for the model in `model_dir`."""
    from lora_export.adapters.peft_io import write_peft_adapter
    from lora_export.adapters.synthetic import random_model_adapter
    from lora_export.models.loading import load_model

    loaded = load_model(str(model_dir), lazy=True)  # shapes only
    adapter = random_model_adapter(loaded, r=rank, alpha=2.0 * rank, targets=ALL_LINEAR, seed=seed, name=out.name)
    write_peft_adapter(adapter, out, base_model=str(model_dir))
    return out


def build_folders(model_dir: Path, work: Path, rank: int) -> tuple[dict[str, tuple[Path, Path | None]], dict]:
    """name -> (folder, adapter file or None), and the build wall seconds of each."""
    from lora_export.adapters import read_adapter
    from lora_export.export.decoder import export_decoder
    from lora_export.export.fused import run_builder
    from lora_export.models.loading import load_model

    adapter_dir = random_adapter_dir(model_dir, work / "adapter", rank)
    adapter = read_adapter(adapter_dir, name="adapter")
    bank = [read_adapter(random_adapter_dir(model_dir, work / f"a{i}", rank, seed=1 + i)) for i in range(BATCH)]
    folders, builds = {}, {}

    def timed(name, fn):
        log(f"building {name}")
        t0 = time.perf_counter()
        fn()
        builds[name] = time.perf_counter() - t0

    for precision in ("fp32", "int4"):
        out = work / f"builder_{precision}"
        timed(f"builder {precision}", lambda o=out, p=precision: run_builder(model_dir, o, p, work / "cache"))
        folders[f"builder {precision}"] = (out, None)
    folders[f"builder int4, batch {BATCH}"] = folders["builder int4"]
    for precision in ("fp32", "int4"):
        for layout in ("merged", "inputs"):
            name = f"fused {layout} {precision}" + (" + adapter" if layout == "inputs" else "")
            out = work / name.replace(" ", "_").replace("+", "")

            def export(o=out, lay=layout, p=precision):
                loaded = load_model(str(model_dir), lazy=True)
                export_decoder(loaded, o, adapters=[adapter], layout=lay, fused=True, precision=p)

            timed(name, export)
            folders[name] = (out, out / "adapters" / "adapter.onnx_adapter" if layout == "inputs" else None)
    out = work / "traced_merged"
    timed(
        "traced merged fp32",
        lambda: export_decoder(load_model(str(model_dir), lazy=True), out, adapters=[adapter], fused=False),
    )
    folders["traced merged fp32"] = (out, None)
    folders[GENERATOR + "fused inputs fp32 + adapter"] = folders["fused inputs fp32 + adapter"]
    out = work / "fused_bank_int4"
    timed(
        "fused bank int4",
        lambda: export_decoder(
            load_model(str(model_dir), lazy=True), out, adapters=bank, layout="bank", fused=True, precision="int4"
        ),
    )
    folders[GENERATOR + f"fused bank int4, {BATCH} rows x {BATCH} adapters"] = (out, None)
    return folders, builds


def measure_setting(folders, prompt_len: int, new_tokens: int, rounds: int, threads: int | None, vocab: int):
    import onnxruntime_genai as og

    from lora_export.bench.generation import genai_model
    from lora_export.bench.latency import Candidate, StepTimes, measure

    prompt = np.random.default_rng(0).integers(1, vocab, size=prompt_len).astype(np.int32)
    candidates, times = [], {}
    for name, (folder, adapter_file) in folders.items():
        if name.endswith(f", batch {BATCH}"):
            steps = StepTimes()
            candidates.append(
                Candidate(name, _genai_batch_call(genai_model(folder, threads), prompt, new_tokens, steps))
            )
            times[name] = steps
            continue
        if name.startswith(GENERATOR):
            steps = StepTimes()
            candidates.append(Candidate(name, _generator_call(folder, threads, prompt, new_tokens, steps)))
            times[name] = steps
            continue
        model = genai_model(folder, threads)
        adapters = None
        if adapter_file is not None:
            adapters = og.Adapters(model)
            adapters.load(str(adapter_file), "a")
        steps = StepTimes()

        def call(_h, model=model, adapters=adapters, steps=steps):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=prompt_len + new_tokens, do_sample=False)
            gen = og.Generator(model, params)
            if adapters is not None:
                gen.set_active_adapter(adapters, "a")
            steps.start()
            gen.append_tokens(prompt[None])
            steps.mark()
            for _ in range(new_tokens - 1):
                token = int(np.argmax(gen.get_output("logits")[0, -1]))
                gen.append_tokens(np.array([[token]], dtype=np.int32))
                steps.mark()

        candidates.append(Candidate(name, call))
        times[name] = steps
    measure(candidates, warmup=1, iters=rounds)
    rows = []
    for name, steps in times.items():
        firsts, _, medians = steps.timed(1)
        rows.append({"candidate": name, "prefill_ms": float(np.median(firsts)), "decode_ms": float(np.median(medians))})
    return rows


def _rows(prompt: np.ndarray, n: int) -> list[list[int]]:
    """`n` prompts of the same length: the prompt rotated (different tokens per row)."""
    return [np.roll(prompt, 7 * i).astype(int).tolist() for i in range(n)]


def _generator_call(folder: Path, threads: int | None, prompt: np.ndarray, new_tokens: int, steps):
    """One greedy generation by our `Generator`, with the same per-token marks: an inputs folder's adapter on one
    row, or a bank folder's adapters one per row (BATCH rows)."""
    from lora_export.runtime import Generator

    gen = Generator(folder, threads=threads, spinning=False)
    names = sorted(gen.adapters())
    bank = gen.layout == "bank"
    prompts = _rows(prompt, BATCH) if bank else _rows(prompt, 1)
    rows = [names[i % len(names)] for i in range(len(prompts))] if names else [None] * len(prompts)

    def call(_h):
        steps.start()
        batch = gen.prefill(prompts, adapters=rows) if bank else gen.prefill(prompts, adapter=rows[0])
        steps.mark()
        for _ in range(new_tokens - 1):
            gen.step(batch, batch.logits.argmax(axis=1).tolist())
            steps.mark()

    return call


def _genai_batch_call(model, prompt: np.ndarray, new_tokens: int, steps):
    """GenAI's own greedy search on BATCH rows at once (GenAI 0.18 takes tokens once for a batch > 1), marks as
    above; `min_length` keeps every row going to `new_tokens`."""
    import onnxruntime_genai as og

    ids = np.asarray(_rows(prompt, BATCH), dtype=np.int32)
    total = ids.shape[1] + new_tokens

    def call(_h):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, batch_size=BATCH, do_sample=False)
        gen = og.Generator(model, params)
        steps.start()
        gen.append_tokens(ids)
        steps.mark()
        for _ in range(new_tokens - 1):
            gen.generate_next_token()
            steps.mark()

    return call


def run_vs_builder(
    *, quick: bool = False, rounds: int | None = None, rank: int = 16, workdir: str | None = None
) -> VsBuilder:
    from lora_export.models.pretrained import model_dir

    bench = VsBuilder()
    layers = 4 if quick else None
    source = model_dir("smollm2", layers=layers)
    shapes = [(16, 8)] if quick else [(64, 128), (1024, 32)]
    rounds = rounds or (2 if quick else 5)
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    bench.settings = {"model": str(source), "rank": rank, "rounds": rounds, "shapes": shapes}
    with tempfile.TemporaryDirectory(prefix="bench_vs_builder_") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        folders, bench.builds_s = build_folders(source, work, rank)
        for threads in (1, None):
            for prompt_len, new_tokens in shapes:
                setting = f"{prompt_len}+{new_tokens}, threads {threads or 'default'}"
                log(f"timing {setting}")
                for row in measure_setting(folders, prompt_len, new_tokens, rounds, threads, vocab):
                    bench.rows.append({"setting": setting, **row})
    by = {(r["setting"], r["candidate"]): r for r in bench.rows}
    for setting in dict.fromkeys(r["setting"] for r in bench.rows):
        for ours, theirs, goal in PAIRS:
            a, b = by[(setting, ours)], by[(setting, theirs)]
            for phase in ("decode", "prefill"):
                value = a[f"{phase}_ms"] / b[f"{phase}_ms"]
                target = goal if phase == "decode" else (1.00 if goal is not None else None)
                bench.ratios.append(
                    {"setting": setting, "phase": phase, "ratio": f"{ours} / {theirs}", "value": value, "goal": target}
                )
    return bench


def report_lines(bench: VsBuilder) -> list[str]:
    lines = ["build wall seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in bench.builds_s.items())]
    lines.append(f"{'setting':<26} {'candidate':<30} {'prefill ms':>11} {'decode ms/tok':>14}")
    for r in bench.rows:
        lines.append(f"{r['setting']:<26} {r['candidate']:<30} {r['prefill_ms']:>11.2f} {r['decode_ms']:>14.3f}")
    lines.append(f"{'setting':<26} {'phase':<8} {'ratio':<52} {'value':>6} goal")
    for r in bench.ratios:
        goal = "" if r["goal"] is None else f"<= {r['goal']:.2f}" + (" ok" if r["value"] <= r["goal"] else " NOT MET")
        lines.append(f"{r['setting']:<26} {r['phase']:<8} {r['ratio']:<52} {r['value']:>6.3f} {goal}")
    return lines

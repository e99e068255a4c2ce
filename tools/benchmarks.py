"""The project's reference benchmark suite: every goal ratio the project set itself, measured in one process.

    python tools/benchmarks.py                # GPT-2 small shape, writes BENCHMARKS.md (several minutes)
    python tools/benchmarks.py --quick --out /tmp/b.md   # the tiny sample, seconds: checks the suite runs

What it measures (ONNX Runtime CPU, r = 8 on `c_attn`, batch 1 / seq 128 unless stated):

- merged export: merged-graph / base-graph latency (<= 1.02); ORT / PyTorch eager speedup; merge-and-export
  time;
- branched export and serving: branched + adapter / merged (<= 1.03); bank with 4 adapters mixed per row /
  branched with one adapter, both at batch 8 (<= 1.15); median adapter switch in `LoraSession` excluding the
  forward (<= 1 ms); `pack-adapter` time (<= 200 ms); the naive route (re-export + new session) per adapter;
- graph passes (when `lora_export.passes.pipeline` exists): optimized / plain branched graph, optimized
  merged graph vs PyTorch eager (>= 3x), LoRA MatMul and node counts.

The `issue` column of the goal table numbers these areas in the project's tracker (2 merged export, 3
branched/bank/serving, 4 passes, 5 TensorRT).

Latencies at one shape are timed together, interleaved, by `lora_export.bench.latency.measure` (inputs
prepared beforehand, rotated between input sets); ratios are of medians, with the median of per-round
ratios beside them. Exports, sessions and packing happen outside the timed regions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Goal:
    metric: str
    issue: int
    goal: str  # human text, e.g. "<= 1.02"
    measured: float | None
    unit: str = ""
    limit: float | None = None  # numeric bound; None = reported only
    lower_is_better: bool = True
    detail: str = ""

    @property
    def status(self) -> str:
        if self.measured is None:
            return "skipped"
        if self.limit is None:
            return "reported"
        ok = self.measured <= self.limit if self.lower_is_better else self.measured >= self.limit
        return "met" if ok else "NOT met"

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "issue": self.issue,
            "goal": self.goal,
            "measured": self.measured,
            "unit": self.unit,
            "status": self.status,
            "detail": self.detail,
        }


@dataclass
class Suite:
    model: str
    quick: bool
    goals: list[Goal] = field(default_factory=list)
    latency: list[dict] = field(default_factory=list)  # rows: group, name, stats
    timings: dict[str, float] = field(default_factory=dict)  # one-off wall times, seconds
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def lora_matmuls(path: Path) -> tuple[int, int]:
    """(LoRA MatMul nodes, all nodes): MatMuls that read a LoRA contract input directly."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    lora = sum(1 for n in g.node if n.op_type == "MatMul" and any(".lora_" in i for i in n.input))
    return lora, len(g.node)


def _optimizer():
    try:
        from lora_export.passes.pipeline import optimize_file
    except Exception as e:  # not built yet, or broken: the suite still runs and says so
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return optimize_file, ""


def _sibling(name: str):
    """Another script of tools/ as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"lora_tools_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def run_generation(args, suite: Suite, loaded, adapters, work: Path) -> None:
    """Issue 9's rows: decoder folders (merged / inputs / bank) generating, vs PyTorch, GenAI and the old path."""
    gb = _sibling("bench_generation")
    folders = gb.export_folders(loaded, adapters, work)
    bench = gb.measure_generation(
        folders,
        loaded,
        [a.name for a in adapters],
        prompt_len=args.gen_prompt,
        new_tokens=args.gen_tokens,
        rounds=args.gen_rounds,
        threads=args.threads,
    )
    suite.latency += bench.rows
    suite.notes += bench.notes
    for g in bench.goals:
        suite.goals.append(Goal(g["metric"], 9, g["goal"], g["measured"], g["unit"], g["limit"], detail=g["detail"]))
    suite.settings["generation"] = bench.settings


def run_suite(args) -> Suite:
    from lora_export.adapters.pack import pack_adapter
    from lora_export.adapters.spec import LoraSpec
    from lora_export.adapters.synthetic import random_adapter
    from lora_export.artifacts.onnxio import read_slots
    from lora_export.backends.onnxrt import OrtRunner, open_session
    from lora_export.backends.torch_runner import TorchRunner
    from lora_export.bench.latency import Candidate, measure, ratio, set_threads, summarize, thread_settings
    from lora_export.bench.standard_graphs import export_standard_graphs
    from lora_export.contract import ADAPTER_INDEX
    from lora_export.models import load_model
    from lora_export.runtime import LoraSession

    suite = Suite(model=args.model, quick=args.quick)
    set_threads(args.threads)
    seq, big_batch = args.seq, args.bank_batch
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lora_benchmarks_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.sections == "speed":
        _speed_section(suite, args, work)
        suite.settings = {
            "warmup": args.warmup,
            "iters": args.speed_iters,
            "bank_iters": "-",
            "bank_batch": "-",
            "input_sets": 3,
            "threads": thread_settings(args.threads),
            "lora": "r=8, alpha=16 on c_attn, one random adapter x (seed 0, B non-zero)",
            "sections": "speed",
        }
        return suite

    log(f"loading {args.model}")
    loaded, suite.timings["load model s"] = _timed(lambda: load_model(args.model))
    spec = LoraSpec(r=8, alpha=16, target_modules=["c_attn"])
    adapters = [random_adapter(loaded.module, spec, seed=i, name=f"adapter{i}") for i in range(4)]
    x = adapters[0]
    if args.only == "generation":
        run_generation(args, suite, loaded, adapters, work)
        suite.settings.update(threads=thread_settings(args.threads), lora="r=8, alpha=16, c_attn, 4 random adapters")
        return suite

    # -- exports (outside timing); the merged one is also the "merge-and-export" and naive-route timing ------
    log("merge-and-export (adapter folded, traced, saved)")
    g = export_standard_graphs(loaded, work, x, kinds=["merged"], force=True)
    suite.timings["merge-and-export s"] = g["merged"].seconds
    log("exporting base, branched and bank graphs")
    g = export_standard_graphs(loaded, work, x, kinds=["base", "branched", "bank"], bank_adapters=adapters, force=True)
    for kind in ("base", "branched", "bank"):
        suite.timings[f"export {kind} s"] = g[kind].seconds
    log("naive route: a new session on the re-exported graph")
    sess, suite.timings["naive new session s"] = _timed(
        lambda: open_session(work / "merged.onnx", threads=args.threads)
    )
    del sess

    optimize_file, why = _optimizer()
    optimized: dict[str, Path] = {}
    if optimize_file is None:
        suite.notes.append(f"optimized/plain skipped: lora_export.passes.pipeline.optimize_file unavailable ({why})")
    else:
        for mode in ("merged", "branched"):
            try:
                log(f"optimizing the {mode} graph")
                _, suite.timings[f"optimize {mode} s"] = _timed(
                    lambda m=mode: optimize_file(work / f"{m}.onnx", work / f"{m}.opt.onnx", force=True)
                )
                optimized[mode] = work / f"{mode}.opt.onnx"
            except Exception as e:
                suite.notes.append(f"optimize {mode} failed, skipped: {type(e).__name__}: {str(e).splitlines()[:1]}")

    def feeds(batch: int, seed: int) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in loaded.make_inputs(batch, seq, seed).items()}

    sets = range(args.input_sets)
    results: list = []

    def record(group: str, measurement) -> dict:
        by = measurement.by_name()
        for s in measurement.stats:
            suite.latency.append({"group": group, **s.to_dict(samples=False)})
        results.append(measurement)
        return by

    # -- group A: batch 1 -------------------------------------------------------------------------------------
    lora_x = read_slots(work / "branched.onnx").adapter_feeds(x)
    runners = {
        "ort/base": OrtRunner(work / "base.onnx", threads=args.threads, spinning=False),
        "ort/merged": OrtRunner(work / "merged.onnx", threads=args.threads, spinning=False),
        "ort/branched+adapter": OrtRunner(work / "branched.onnx", threads=args.threads, spinning=False),
        "torch/eager": TorchRunner(loaded, None),
    }
    for mode, path in optimized.items():
        runners[f"ort/{mode}.optimized"] = OrtRunner(path, threads=args.threads, spinning=False)
    extra = {"ort/branched+adapter": lora_x, "ort/branched.optimized": lora_x}
    for r in runners.values():
        r.__enter__()
    cands = [
        Candidate.from_runner(
            name, r, [{**feeds(1, i), **extra.get(name, {})} for i in sets], tokens=seq, meta={"batch": 1, "seq": seq}
        )
        for name, r in runners.items()
    ]
    log(f"group A: {len(cands)} candidates at batch 1, seq {seq}, {args.iters} interleaved rounds")
    a = record(f"batch 1, seq {seq}", measure(cands, warmup=args.warmup, iters=args.iters, seed=1))
    for r in runners.values():
        r.__exit__(None, None, None)

    # -- group B: batch 8, bank (4 adapters mixed per row) vs branched (one adapter) -------------------------
    bank_lora = read_slots(work / "bank.onnx").bank_feeds(adapters)
    index = np.arange(big_batch, dtype=np.int64) % len(adapters)
    r_bank = OrtRunner(work / "bank.onnx", threads=args.threads, spinning=False).__enter__()
    r_br = OrtRunner(work / "branched.onnx", threads=args.threads, spinning=False).__enter__()
    cands = [
        Candidate.from_runner(
            "ort/bank4 (mixed rows)",
            r_bank,
            [{**feeds(big_batch, i), **bank_lora, ADAPTER_INDEX: index} for i in sets],
            tokens=big_batch * seq,
        ),
        Candidate.from_runner(
            "ort/branched+adapter",
            r_br,
            [{**feeds(big_batch, i), **lora_x} for i in sets],
            tokens=big_batch * seq,
        ),
    ]
    log(f"group B: bank vs branched at batch {big_batch}, seq {seq}, {args.bank_iters} interleaved rounds")
    b = record(f"batch {big_batch}, seq {seq}", measure(cands, warmup=args.warmup, iters=args.bank_iters, seed=2))
    r_bank.__exit__(None, None, None)
    r_br.__exit__(None, None, None)

    # -- adapter switching in LoraSession ----------------------------------------------------------------------
    log("LoraSession: load adapters, switch time")
    session = LoraSession(work / "branched.onnx", threads=args.threads)
    load_ms = []
    for ad in adapters:
        _, s = _timed(lambda ad=ad: session.load_adapter(ad.name, ad))
        load_ms.append(s * 1e3)
    suite.timings["LoraSession.load_adapter median ms"] = float(np.median(load_ms))
    names = [ad.name for ad in adapters]
    f1 = feeds(1, 0)

    class _NoForward:  # the ORT session with its forward replaced: what remains is the switch itself
        def __init__(self, real):
            self.real = real

        def run(self, outputs, feeds, run_options=None):
            return [None] * len(outputs)

    real = session.session
    session.session = _NoForward(real)
    turn = iter(range(10**9))
    switch = measure(
        [
            Candidate.from_callable(
                "switch (no forward)", lambda: session.run(f1, adapter=names[next(turn) % len(names)])
            )
        ],
        warmup=20,
        iters=args.switch_iters,
    )
    session.session = real
    sw = record("LoraSession switch, forward excluded", switch).get("switch (no forward)")
    # with the forward: alternating adapters vs always the same one, interleaved (the difference is the switch)
    turn2 = iter(range(10**9))
    with_fwd = measure(
        [
            Candidate.from_callable(
                "LoraSession.run alternating", lambda: session.run(f1, adapter=names[next(turn2) % len(names)])
            ),
            Candidate.from_callable("LoraSession.run same adapter", lambda: session.run(f1, adapter=names[0])),
        ],
        warmup=args.warmup,
        iters=max(args.iters // 2, 3),
        seed=3,
    )
    c = record(f"LoraSession, batch 1, seq {seq}", with_fwd)
    session.close()

    # -- pack-adapter ------------------------------------------------------------------------------------------
    log("pack-adapter timing")
    pack_ms = []
    for i in range(args.pack_iters + 1):
        out = work / f"pack{i}.onnx_adapter"
        _, s = _timed(lambda out=out: pack_adapter(x, out))
        if i:  # the first call warms imports and the allocator
            pack_ms.append(s * 1e3)
    pack = summarize("pack-adapter", pack_ms)
    suite.latency.append({"group": "one-off", **pack.to_dict(samples=False)})

    # -- goals -------------------------------------------------------------------------------------------------
    def rg(num, den, by_num, by_den=None) -> tuple[float, str]:
        rr = ratio(by_num[num], (by_den or by_num)[den])
        return rr.value, f"p50 {by_num[num].p50:.2f} / {(by_den or by_num)[den].p50:.2f} ms; paired {rr.paired:.3f}"

    G = suite.goals
    v, d = rg("ort/merged", "ort/base", a)
    G.append(Goal(f"merged / base graph latency (b1 s{seq})", 2, "<= 1.02", v, "x", 1.02, detail=d))
    sp = a["torch/eager"].p50 / a["ort/base"].p50
    G.append(
        Goal(
            f"ORT speedup over PyTorch eager, base graph (b1 s{seq})",
            2,
            "reported (plain ORT ~2.5x)",
            sp,
            "x",
            detail=f"eager {a['torch/eager'].p50:.2f} ms / ORT {a['ort/base'].p50:.2f} ms",
        )
    )
    sp = a["torch/eager"].p50 / a["ort/merged"].p50
    G.append(
        Goal(
            f"ORT merged graph speedup over PyTorch eager (b1 s{seq})",
            2,
            "reported",
            sp,
            "x",
            detail=f"eager {a['torch/eager'].p50:.2f} ms / ORT merged {a['ort/merged'].p50:.2f} ms",
        )
    )
    G.append(
        Goal("merge-and-export wall time", 2, "reported", suite.timings["merge-and-export s"], "s", detail="no verify")
    )
    v, d = rg("ort/branched+adapter", "ort/merged", a)
    G.append(Goal(f"branched + adapter / merged (b1 s{seq})", 3, "<= 1.03", v, "x", 1.03, detail=d))
    v, d = rg("ort/bank4 (mixed rows)", "ort/branched+adapter", b)
    G.append(
        Goal(f"bank, 4 adapters / branched, 1 adapter (b{big_batch} s{seq})", 3, "<= 1.15", v, "x", 1.15, detail=d)
    )
    G.append(
        Goal(
            "adapter switch in LoraSession, median, forward excluded",
            3,
            "<= 1 ms",
            sw.p50,
            "ms",
            1.0,
            detail=f"p90 {sw.p90:.4f} ms, p99 {sw.p99:.4f} ms over {sw.iters} switches between 4 resident adapters",
        )
    )
    diff = c["LoraSession.run alternating"].p50 - c["LoraSession.run same adapter"].p50
    G.append(
        Goal(
            f"switch with the forward: alternating - same adapter, p50 (b1 s{seq})",
            3,
            "reported (noise-bound)",
            diff,
            "ms",
            detail=f"{c['LoraSession.run alternating'].p50:.2f} - {c['LoraSession.run same adapter'].p50:.2f} ms",
        )
    )
    G.append(
        Goal(
            "pack-adapter (.onnx_adapter), median",
            3,
            "<= 200 ms",
            pack.p50,
            "ms",
            200.0,
            detail=f"p90 {pack.p90:.1f} ms",
        )
    )
    naive = suite.timings["merge-and-export s"] + suite.timings["naive new session s"]
    G.append(
        Goal(
            "naive route per adapter: re-export + new session",
            3,
            "reported (contrast)",
            naive,
            "s",
            detail=f"vs LoraSession.load_adapter {suite.timings['LoraSession.load_adapter median ms']:.1f} ms "
            f"+ switch {sw.p50:.3f} ms",
        )
    )
    if "branched" in optimized:
        v, d = rg("ort/branched.optimized", "ort/branched+adapter", a)
        G.append(Goal(f"optimized / plain branched graph (b1 s{seq})", 4, "reported (< 1 is faster)", v, "x", detail=d))
        (lp, np_), (lo, no) = lora_matmuls(work / "branched.onnx"), lora_matmuls(optimized["branched"])
        G.append(
            Goal(
                "LoRA MatMul nodes after the pipeline (sibling fusion)",
                4,
                "reported",
                float(lo),
                "",
                detail=f"plain {lp} LoRA MatMuls / {np_} nodes -> optimized {lo} / {no} (GPT-2 c_attn has no siblings)",
            )
        )
    else:
        G.append(
            Goal(f"optimized / plain branched graph (b1 s{seq})", 4, "reported", None, detail="passes not available")
        )
    if "merged" in optimized:
        sp = a["torch/eager"].p50 / a["ort/merged.optimized"].p50
        G.append(
            Goal(
                f"optimized merged graph speedup over PyTorch eager (b1 s{seq})",
                4,
                ">= 3x",
                sp,
                "x",
                3.0,
                lower_is_better=False,
                detail=f"eager {a['torch/eager'].p50:.2f} ms / optimized {a['ort/merged.optimized'].p50:.2f} ms",
            )
        )
    else:
        G.append(
            Goal("optimized merged graph speedup over PyTorch eager", 4, ">= 3x", None, detail="passes not available")
        )

    if args.generation:
        run_generation(args, suite, loaded, adapters, work)
    else:
        suite.notes.append("generation rows (issue 9) skipped (--quick or --no-generation): tools/bench_generation.py")

    suite.settings = {
        **suite.settings,
        "seq": seq,
        "bank_batch": big_batch,
        "warmup": args.warmup,
        "iters": args.iters,
        "bank_iters": args.bank_iters,
        "switch_iters": args.switch_iters,
        "input_sets": args.input_sets,
        "threads": thread_settings(args.threads),
        "lora": "r=8, alpha=16, c_attn, 4 random adapters (seeds 0-3, B non-zero)",
        "order": "shuffle (interleaved, seeded)",
    }
    if args.sections == "all":
        _speed_section(suite, args, work)
    return suite


def _speed_section(suite: Suite, args, work: Path) -> None:
    """Issue 11: fused and int8/int4 decoder folders, prefill and decode ms/token (tools/bench_speed.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_speed import run_speed

    run_speed(suite, args, work, log, Goal)


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "x":
        return f"{v:.3f}x"
    if unit == "ms":
        return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:g}"


def _generation_line(gen: dict | None) -> list[str]:
    if not gen:
        return [""]
    return [
        "",
        f"Generation (issue 9): decoder folders of the same model (merged: adapter0; inputs and bank: all four), "
        f"fp32, a {gen['prompt']}-token prompt, {gen['new_tokens']} new tokens, greedy, eos ignored; each call is a "
        f"whole generation, {gen['rounds']} interleaved rounds after {gen['warmup']} warm-up (the old path "
        f"{gen['old_path_rounds']}), a mark at every token: TTFT = prefill + first token, ms/token pooled over the "
        f"rest; ratios are of ms/token medians, paired = median of per-round ratios. ONNX Runtime threads: "
        f"{gen['threads']}.",
        "",
    ]


def to_markdown(suite: Suite, machine: dict, command: str, date: str) -> str:
    from lora_export.bench.report import machine_line

    about = (
        "QUICK mode: tiny sample, a smoke run, not the reference numbers"
        if suite.quick
        else "GPT-2 small shape, 12x768, random weights"
    )
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `tools/benchmarks.py` on {date}.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_line(machine)}.",
        "",
        f"Model: `{suite.model}` ({about}); "
        f"{suite.settings.get('lora')}. ONNX Runtime CPU, fp32. Latencies at one shape are interleaved in one process "
        f"(warm-up {suite.settings.get('warmup')}, {suite.settings.get('iters')} rounds at batch 1, "
        f"{suite.settings.get('bank_iters')} at batch {suite.settings.get('bank_batch')}; "
        f"{suite.settings.get('input_sets')} rotating input sets; inputs prepared outside timing); ratios are of "
        "medians, the paired value is the median of per-round ratios. Threads: "
        f"{json.dumps(suite.settings.get('threads'))}.",
        *_generation_line(suite.settings.get("generation")),
        "## Goals",
        "",
        "| issue | metric | goal | measured | status | detail |",
        "|---|---|---|---|---|---|",
    ]
    for g in suite.goals:
        lines.append(f"| {g.issue} | {g.metric} | {g.goal} | {_fmt(g.measured, g.unit)} | {g.status} | {g.detail} |")
    lines += [
        "",
        "## Latencies",
        "",
        "| group | candidate | p50 ms | p90 ms | p99 ms | iters | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in suite.latency:
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else ""
        lines.append(
            f"| {r['group']} | {r['name']} | {r['p50']:.3f} | {r['p90']:.3f} | {r['p99']:.3f} | {r['iters']} | {tps} |"
        )
    lines += ["", "## One-off wall times", "", "| step | seconds / ms |", "|---|---|"]
    for k, v in suite.timings.items():
        lines.append(f"| {k} | {v:.3f} |")
    notes = list(suite.notes) + [
        "The machine is shared (2 cores, other jobs running): absolute latencies are noisy; the interleaved "
        "ratios are the numbers to read, and goals near their bound should be re-measured on a quiet machine.",
        "Threads: with 2 intra-op threads on a shared 2-core machine, every parallel kernel stalls while another "
        "process holds a core (p90 was 2-3x p50 in a trial run); one thread per runner (`--threads 1`) keeps the "
        "interleaved ratios stable, at the cost of absolute latency.",
        "TensorRT goals need a GPU with TensorRT and are measured by tools/gpu_check.sh, not here.",
    ]
    lines += ["", "## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="Tiny sample, few iterations: a seconds-long smoke run.")
    p.add_argument("--model", default=None, help="Model (default sample:gpt2-small; --quick: sample:gpt2).")
    p.add_argument("--out", default=None, help="Markdown output (default BENCHMARKS.md; --quick: none).")
    p.add_argument("--json", dest="json_path", default=None, help="Also write the results as JSON.")
    p.add_argument("--iters", type=int, default=None, help="Timed rounds at batch 1.")
    p.add_argument("--bank-iters", type=int, default=None, help="Timed rounds at the bank batch.")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="Intra-op threads (default: the libraries' own).")
    p.add_argument("--workdir", default=None, help="Keep exported graphs here (default: a temp dir).")
    p.add_argument(
        "--sections", choices=["all", "core", "speed"], default="all", help="core: issues 2-4; speed: issue 11."
    )
    p.add_argument("--speed-iters", type=int, default=None, help="speed: interleaved prefill rounds.")
    p.add_argument("--speed-reps", type=int, default=None, help="speed: greedy generations timed per decoder.")
    p.add_argument("--speed-new-tokens", type=int, default=None, help="speed: tokens per generation (default 128).")
    p.add_argument(
        "--generation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Decoder generation rows (default: on, off with --quick).",
    )
    p.add_argument("--only", choices=["generation"], default=None, help="Run only this group.")
    p.add_argument("--gen-rounds", type=int, default=None, help="Interleaved rounds of whole generations.")
    args = p.parse_args(argv)
    q = args.quick
    args.model = args.model or ("sample:gpt2" if q else "sample:gpt2-small")
    args.iters = args.iters or (5 if q else 60)
    args.bank_iters = args.bank_iters or (3 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 5)
    args.seq = 16 if q else 128
    args.bank_batch = 8
    args.input_sets = 2 if q else 3
    args.switch_iters = 50 if q else 1000
    args.pack_iters = 3 if q else 10
    args.speed_iters = args.speed_iters or (2 if q else 15)
    args.speed_reps = args.speed_reps or (1 if q else 2)
    args.speed_new_tokens = args.speed_new_tokens or (6 if q else 128)
    args.generation = (not q) if args.generation is None else args.generation
    args.gen_prompt, args.gen_tokens = (8, 8) if q else (32, 128)
    args.gen_rounds = args.gen_rounds or (2 if q else 5)
    if args.out is None and not q:
        args.out = str(ROOT / "BENCHMARKS.md")
    return args


# Sections of BENCHMARKS.md written by other tools (tools/bench_scale.py), kept when this suite rewrites the file.
KEPT_SECTIONS = ("## Export memory at scale",)


def kept_sections(path: Path) -> str:
    """The sections of `path` that other tools own (each runs to the next `## ` heading or the end)."""
    if not path.exists():
        return ""
    text, kept = path.read_text(), []
    for heading in KEPT_SECTIONS:
        start = text.find("\n" + heading)
        if start >= 0:
            end = text.find("\n## ", start + 1)
            kept.append(text[start : end if end >= 0 else len(text)].rstrip("\n") + "\n")
    return "".join(kept)


def main(argv: list[str] | None = None) -> Suite:
    from lora_export.bench.report import machine_info, now_utc

    args = parse_args(argv)
    command = "python tools/benchmarks.py" + ("" if not argv else " " + shlex.join(argv))
    if argv is None and len(sys.argv) > 1:
        command += " " + shlex.join(sys.argv[1:])
    t0 = time.perf_counter()
    suite = run_suite(args)
    machine = machine_info()
    md = to_markdown(suite, machine, command, now_utc())
    log(f"done in {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(md + kept_sections(Path(args.out)))
        log(f"wrote {args.out}")
    else:
        print(md)
    if args.json_path:
        data = {
            "model": suite.model,
            "quick": suite.quick,
            "command": command,
            "machine": machine,
            "settings": suite.settings,
            "goals": [g.to_dict() for g in suite.goals],
            "latency": suite.latency,
            "timings": suite.timings,
            "notes": suite.notes,
        }
        Path(args.json_path).write_text(json.dumps(data, indent=2, default=str))
    return suite


if __name__ == "__main__":
    main()

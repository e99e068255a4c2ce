"""The project's reference benchmark suite: every goal ratio the project set itself, measured in one process
(`tools/benchmarks.py` is its command line; `suite_report` writes BENCHMARKS.md).

What it measures (ONNX Runtime CPU, r = 8 on `c_attn`, batch 1 / seq 128 unless stated):

- merged export: merged-graph / base-graph latency (<= 1.02); ORT / PyTorch eager speedup; merge-and-export
  time;
- branched export and serving: branched + adapter / merged (<= 1.03); bank with 4 adapters mixed per row /
  branched with one adapter, both at batch 8 (<= 1.15); median adapter switch in `LoraSession` excluding the
  forward (<= 1 ms); `pack-adapter` time (<= 200 ms); the naive route (re-export + new session) per adapter;
- graph passes (when `lora_export.passes.pipeline` exists): optimized / plain branched graph, optimized
  merged graph vs PyTorch eager (>= 3x), LoRA MatMul and node counts;
- generation (`bench.generation`, issue 9) and speed (`bench.speed`, issue 11).

Latencies at one shape are timed together, interleaved, by `lora_export.bench.latency.measure` (inputs
prepared beforehand, rotated between input sets); ratios are of medians, with the median of per-round
ratios beside them. Exports, sessions and packing happen outside the timed regions.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_export.bench.goals import Goal, Suite, SuiteOptions, log, timed
from lora_export.bench.latency import LatencyStats, Measurement

__all__ = ["Goal", "Suite", "SuiteOptions", "run_suite"]


@dataclass
class Measured:
    """What the core groups measured, by candidate name, for the goals."""

    batch1: dict[str, LatencyStats] = field(default_factory=dict)
    bank: dict[str, LatencyStats] = field(default_factory=dict)
    switch: LatencyStats | None = None
    with_forward: dict[str, LatencyStats] = field(default_factory=dict)
    pack: LatencyStats | None = None


def lora_matmuls(path: Path) -> tuple[int, int]:
    """(LoRA MatMul nodes, all nodes): MatMuls that read a LoRA contract input directly."""
    import onnx

    from lora_export.contract import is_lora_input

    g = onnx.load(str(path), load_external_data=False).graph
    lora = sum(1 for n in g.node if n.op_type == "MatMul" and any(is_lora_input(i) for i in n.input))
    return lora, len(g.node)


def _optimizer():
    try:
        from lora_export.passes.pipeline import optimize_file
    except Exception as e:  # not built yet, or broken: the suite still runs and says so
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return optimize_file, ""


def run_generation(args: SuiteOptions, suite: Suite, loaded, adapters, work: Path) -> None:
    """Issue 9's rows: decoder folders (merged / inputs / bank) generating, vs PyTorch, GenAI and the old path."""
    from lora_export.bench import generation

    folders = generation.export_folders(loaded, adapters, work)
    bench = generation.measure_generation(
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


def speed_section(suite: Suite, args: SuiteOptions, work: Path) -> None:
    """Issue 11: fused and int8/int4 decoder folders, prefill and decode ms/token (`bench.speed`)."""
    from lora_export.bench.speed import run_speed

    run_speed(suite, args, work, log)


def export_suite_graphs(suite: Suite, args: SuiteOptions, loaded, adapters, work: Path) -> dict[str, Path]:
    """The standard graphs (outside timing; the merged one is also the "merge-and-export" and naive-route
    timing), a new session on the merged graph, and the optimized merged/branched graphs: mode -> path."""
    from lora_export.backends.onnxrt import open_session
    from lora_export.bench.standard_graphs import export_standard_graphs

    x = adapters[0]
    log("merge-and-export (adapter folded, traced, saved)")
    g = export_standard_graphs(loaded, work, x, kinds=["merged"], force=True)
    suite.timings["merge-and-export s"] = g["merged"].seconds
    log("exporting base, branched and bank graphs")
    g = export_standard_graphs(loaded, work, x, kinds=["base", "branched", "bank"], bank_adapters=adapters, force=True)
    for kind in ("base", "branched", "bank"):
        suite.timings[f"export {kind} s"] = g[kind].seconds
    log("naive route: a new session on the re-exported graph")
    sess, suite.timings["naive new session s"] = timed(lambda: open_session(work / "merged.onnx", threads=args.threads))
    del sess

    optimize_file, why = _optimizer()
    optimized: dict[str, Path] = {}
    if optimize_file is None:
        suite.notes.append(f"optimized/plain skipped: lora_export.passes.pipeline.optimize_file unavailable ({why})")
        return optimized
    for mode in ("merged", "branched"):
        try:
            log(f"optimizing the {mode} graph")
            _, suite.timings[f"optimize {mode} s"] = timed(
                lambda m=mode: optimize_file(work / f"{m}.onnx", work / f"{m}.opt.onnx", force=True)
            )
            optimized[mode] = work / f"{mode}.opt.onnx"
        except Exception as e:
            suite.notes.append(f"optimize {mode} failed, skipped: {type(e).__name__}: {str(e).splitlines()[:1]}")
    return optimized


class _Feeds:
    """Model inputs at the suite's sequence length, as numpy."""

    def __init__(self, loaded, seq: int):
        self.loaded, self.seq = loaded, seq

    def __call__(self, batch: int, seed: int) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.loaded.make_inputs(batch, self.seq, seed).items()}


def _record(suite: Suite, group: str, measurement: Measurement) -> dict[str, LatencyStats]:
    for s in measurement.stats:
        suite.latency.append({"group": group, **s.to_dict(samples=False)})
    return measurement.by_name()


def measure_batch1(suite: Suite, args: SuiteOptions, loaded, x, work: Path, optimized: dict[str, Path]):
    """Group A: base, merged, branched + adapter, the optimized graphs and PyTorch eager at batch 1."""
    from lora_export.artifacts.onnxio import read_slots
    from lora_export.backends.onnxrt import OrtRunner
    from lora_export.backends.torch_runner import TorchRunner
    from lora_export.bench.latency import Candidate, measure

    seq, feeds, sets = args.seq, _Feeds(loaded, args.seq), range(args.input_sets)
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
    a = _record(suite, f"batch 1, seq {seq}", measure(cands, warmup=args.warmup, iters=args.iters, seed=1))
    for r in runners.values():
        r.__exit__(None, None, None)
    return a


def measure_bank(suite: Suite, args: SuiteOptions, loaded, adapters, work: Path):
    """Group B: batch 8, bank (4 adapters mixed per row) vs branched (one adapter)."""
    from lora_export.artifacts.onnxio import read_slots
    from lora_export.backends.onnxrt import OrtRunner
    from lora_export.bench.latency import Candidate, measure
    from lora_export.contract import ADAPTER_INDEX

    seq, big_batch, feeds, sets = args.seq, args.bank_batch, _Feeds(loaded, args.seq), range(args.input_sets)
    lora_x = read_slots(work / "branched.onnx").adapter_feeds(adapters[0])
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
    b = _record(
        suite, f"batch {big_batch}, seq {seq}", measure(cands, warmup=args.warmup, iters=args.bank_iters, seed=2)
    )
    r_bank.__exit__(None, None, None)
    r_br.__exit__(None, None, None)
    return b


def measure_switch(suite: Suite, args: SuiteOptions, loaded, adapters, work: Path, m: Measured) -> None:
    """Adapter switching in LoraSession: load time, the switch with the forward removed, and with it."""
    from lora_export.bench.latency import Candidate, measure
    from lora_export.runtime import LoraSession

    log("LoraSession: load adapters, switch time")
    session = LoraSession(work / "branched.onnx", threads=args.threads)
    load_ms = []
    for ad in adapters:
        _, s = timed(lambda ad=ad: session.load_adapter(ad.name, ad))
        load_ms.append(s * 1e3)
    suite.timings["LoraSession.load_adapter median ms"] = float(np.median(load_ms))
    names = [ad.name for ad in adapters]
    f1 = _Feeds(loaded, args.seq)(1, 0)

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
    m.switch = _record(suite, "LoraSession switch, forward excluded", switch).get("switch (no forward)")
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
    m.with_forward = _record(suite, f"LoraSession, batch 1, seq {args.seq}", with_fwd)
    session.close()


def measure_pack(suite: Suite, args: SuiteOptions, x, work: Path) -> LatencyStats:
    """pack-adapter wall times (the first call, which warms imports and the allocator, not counted)."""
    from lora_export.adapters.pack import pack_adapter
    from lora_export.bench.latency import summarize

    log("pack-adapter timing")
    pack_ms = []
    for i in range(args.pack_iters + 1):
        out = work / f"pack{i}.onnx_adapter"
        _, s = timed(lambda out=out: pack_adapter(x, out))
        if i:
            pack_ms.append(s * 1e3)
    pack = summarize("pack-adapter", pack_ms)
    suite.latency.append({"group": "one-off", **pack.to_dict(samples=False)})
    return pack


def _ratio_goal(num: str, den: str, by_num, by_den=None) -> tuple[float, str]:
    from lora_export.bench.latency import ratio

    rr = ratio(by_num[num], (by_den or by_num)[den])
    return rr.value, f"p50 {by_num[num].p50:.2f} / {(by_den or by_num)[den].p50:.2f} ms; paired {rr.paired:.3f}"


def core_goals(suite: Suite, args: SuiteOptions, m: Measured) -> None:
    """Issues 2 and 3: merged export, branched and bank graphs, adapter switching, packing, the naive route."""
    seq, big_batch, a, b, sw, c, pack = args.seq, args.bank_batch, m.batch1, m.bank, m.switch, m.with_forward, m.pack
    G = suite.goals
    v, d = _ratio_goal("ort/merged", "ort/base", a)
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
    v, d = _ratio_goal("ort/branched+adapter", "ort/merged", a)
    G.append(Goal(f"branched + adapter / merged (b1 s{seq})", 3, "<= 1.03", v, "x", 1.03, detail=d))
    v, d = _ratio_goal("ort/bank4 (mixed rows)", "ort/branched+adapter", b)
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


def passes_goals(suite: Suite, args: SuiteOptions, m: Measured, work: Path, optimized: dict[str, Path]) -> None:
    """Issue 4: the optimized graphs against the plain ones and PyTorch eager."""
    seq, a, G = args.seq, m.batch1, suite.goals
    if "branched" in optimized:
        v, d = _ratio_goal("ort/branched.optimized", "ort/branched+adapter", a)
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


def _core_settings(args: SuiteOptions) -> dict:
    from lora_export.bench.latency import thread_settings

    return {
        "seq": args.seq,
        "bank_batch": args.bank_batch,
        "warmup": args.warmup,
        "iters": args.iters,
        "bank_iters": args.bank_iters,
        "switch_iters": args.switch_iters,
        "input_sets": args.input_sets,
        "threads": thread_settings(args.threads),
        "lora": "r=8, alpha=16, c_attn, 4 random adapters (seeds 0-3, B non-zero)",
        "order": "shuffle (interleaved, seeded)",
    }


def _speed_settings(args: SuiteOptions) -> dict:
    from lora_export.bench.latency import thread_settings

    return {
        "warmup": args.warmup,
        "iters": args.speed_iters,
        "bank_iters": "-",
        "bank_batch": "-",
        "input_sets": 3,
        "threads": thread_settings(args.threads),
        "lora": "r=8, alpha=16 on c_attn, one random adapter x (seed 0, B non-zero)",
        "sections": "speed",
    }


def run_suite(args: SuiteOptions) -> Suite:
    """Measure every goal `args` asks for (sections all / core / speed; `only="generation"`)."""
    from lora_export.adapters.spec import LoraSpec
    from lora_export.adapters.synthetic import random_adapter
    from lora_export.bench.latency import set_threads, thread_settings
    from lora_export.models import load_model

    suite = Suite(model=args.model, quick=args.quick)
    set_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lora_benchmarks_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.sections == "speed":
        speed_section(suite, args, work)
        suite.settings = _speed_settings(args)
        return suite

    log(f"loading {args.model}")
    loaded, suite.timings["load model s"] = timed(lambda: load_model(args.model))
    spec = LoraSpec(r=8, alpha=16, target_modules=["c_attn"])
    adapters = [random_adapter(loaded.module, spec, seed=i, name=f"adapter{i}") for i in range(4)]
    x = adapters[0]
    if args.only == "generation":
        run_generation(args, suite, loaded, adapters, work)
        suite.settings.update(threads=thread_settings(args.threads), lora="r=8, alpha=16, c_attn, 4 random adapters")
        return suite

    optimized = export_suite_graphs(suite, args, loaded, adapters, work)
    m = Measured()
    m.batch1 = measure_batch1(suite, args, loaded, x, work, optimized)
    m.bank = measure_bank(suite, args, loaded, adapters, work)
    measure_switch(suite, args, loaded, adapters, work, m)
    m.pack = measure_pack(suite, args, x, work)
    core_goals(suite, args, m)
    passes_goals(suite, args, m, work, optimized)

    if args.generation:
        run_generation(args, suite, loaded, adapters, work)
    else:
        suite.notes.append("generation rows (issue 9) skipped (--quick or --no-generation): tools/bench_generation.py")

    suite.settings = {**suite.settings, **_core_settings(args)}
    if args.sections == "all":
        speed_section(suite, args, work)
    return suite

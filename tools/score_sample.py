"""The paper-style task table for `sample:e2e`: generate on the test split, score BLEU / ROUGE-L / METEOR.

    python tools/score_sample.py                         # test split, every deployment
    python tools/score_sample.py --rows quantized        # PEFT, then fused, int8, int8-block, int4 folders
    python tools/score_sample.py --split dev --limit 50 --markdown table.md --json table.json

Rows: the base model without adapter (scored against each task's references), PyTorch + PEFT for each
adapter (transformers `generate`, greedy), the ONNX decoder folders (merged, branched, bank with mixed rows),
and folders made by `lora_export.api.optimize` (`fused`: attention/normalization fusions; `int8`, `int8-block`,
`int4`: quantized base weights, block 32) on the bank folder (adapters stay float) or, with
`--optimize-from merged`, on each adapter's merged folder. A deployment must not change the task score: the
rows are printed side by side, with how many generations equal PyTorch + PEFT's for the same items.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from lora_export.models import e2e  # noqa: E402
from lora_export.verify import task_run  # noqa: E402


def peft_rows(split: str, limit: int | None, *, base: bool = True, peft: bool = True) -> list[task_run.TaskRow]:
    from peft import PeftModel

    records = e2e.records(split)[:limit]
    prompts = [e2e.prompt(r.mr) for r in records]
    model0 = task_run.load_causal_lm(e2e.model_dir())
    rows = []
    for task in e2e.ADAPTERS if base else ():
        refs = [r.refs(task) for r in records]
        gen = task_run.torch_generator(e2e.model_dir(), model=model0)
        rows.append(task_run.evaluate("PyTorch base (no adapter)", task, gen, prompts, refs))
    for task in e2e.ADAPTERS if peft else ():
        refs = [r.refs(task) for r in records]
        model = PeftModel.from_pretrained(copy.deepcopy(model0), str(e2e.adapter_dir(task))).eval()
        gen = task_run.torch_generator(e2e.model_dir(), model=model)
        rows.append(task_run.evaluate("PyTorch + PEFT", task, gen, prompts, refs))
    return rows


def onnx_rows(split: str, limit: int | None, work: Path, layouts: list[str]) -> list[task_run.TaskRow]:
    """merged (one folder per adapter), inputs (adapter by name), bank (rows alternate the adapters in each batch)."""
    from lora_export import api

    records = e2e.records(split)[:limit]
    prompts = [e2e.prompt(r.mr) for r in records]
    tok = task_run.load_tokenizer(e2e.model_dir())
    specs = e2e.adapter_specs()
    rows = []
    for layout in layouts:
        if layout == "merged":
            for task, spec in zip(e2e.ADAPTERS, specs):
                folder = work / f"merged_{task}"
                api.export_decoder(e2e.SPEC, folder, adapters=[spec], layout="merged", verify=False, force=True)
                gen = task_run.onnx_generator(folder, tok)
                rows.append(task_run.evaluate("ONNX merged", task, gen, prompts, [r.refs(task) for r in records]))
            continue
        folder = work / layout
        api.export_decoder(e2e.SPEC, folder, adapters=specs, layout=layout, verify=False, force=True)
        if layout == "inputs":
            for task in e2e.ADAPTERS:
                gen = task_run.onnx_generator(folder, tok, adapter=task)
                rows.append(task_run.evaluate("ONNX branched", task, gen, prompts, [r.refs(task) for r in records]))
        else:  # one batch mixes both adapters row by row; each row is scored against its own task
            mixed = [e2e.ADAPTERS[i % 2] for i in range(len(prompts))]
            outputs = task_run.onnx_generator(folder, tok, adapters=list(e2e.ADAPTERS))(prompts)
            for task in e2e.ADAPTERS:
                idx = [i for i, t in enumerate(mixed) if t == task]
                scores = task_run.score([outputs[i] for i in idx], [records[i].refs(task) for i in idx])
                row = task_run.TaskRow("ONNX bank (mixed rows)", task, scores, [outputs[i] for i in idx])
                row.items = idx
                rows.append(row)
    return rows


# optimized deployments: `api.optimize` on a decoder folder (as lora_export.bench.speed makes them)
OPTIMIZED = {
    "fused": dict(fuse="all"),
    "int8": dict(quantize="int8"),
    "int8-block": dict(quantize="int8-block", block_size=32),
    "int4": dict(quantize="int4", block_size=32),
}


def optimized_rows(
    split: str, limit: int | None, work: Path, names: list[str], source: str, timings: dict[str, float]
) -> list[task_run.TaskRow]:
    """Each of `names` (OPTIMIZED) made by `api.optimize` on the bank folder of both adapters (base weights
    fused/quantized, adapters float; each adapter runs over all items) or on each adapter's merged folder
    (the adapter folded in, then fused/quantized with the base)."""
    from lora_export import api

    records = e2e.records(split)[:limit]
    prompts = [e2e.prompt(r.mr) for r in records]
    tok = task_run.load_tokenizer(e2e.model_dir())
    specs = e2e.adapter_specs()
    rows = []
    if source == "bank":
        folder = work / "bank"
        api.export_decoder(e2e.SPEC, folder, adapters=specs, layout="bank", verify=False, force=True)
        for name in names:
            out = work / f"bank_{name}"
            t0 = time.perf_counter()
            api.optimize(folder, out, force=True, **OPTIMIZED[name])
            timings[f"optimize bank {name}"] = time.perf_counter() - t0
            for task in e2e.ADAPTERS:
                gen = task_run.onnx_generator(out, tok, adapter=task)
                label = f"ONNX bank, {name}" + (" base" if name != "fused" else "")
                rows.append(task_run.evaluate(label, task, gen, prompts, [r.refs(task) for r in records]))
        return rows
    for task, spec in zip(e2e.ADAPTERS, specs):
        folder = work / f"merged_{task}"
        api.export_decoder(e2e.SPEC, folder, adapters=[spec], layout="merged", verify=False, force=True)
        for name in names:
            out = work / f"merged_{task}_{name}"
            t0 = time.perf_counter()
            api.optimize(folder, out, force=True, **OPTIMIZED[name])
            timings[f"optimize merged {task} {name}"] = time.perf_counter() - t0
            gen = task_run.onnx_generator(out, tok)
            rows.append(task_run.evaluate(f"ONNX merged, {name}", task, gen, prompts, [r.refs(task) for r in records]))
    return rows


def same_text(rows: list[task_run.TaskRow]) -> list[str]:
    """Per row: how many of its outputs equal PyTorch + PEFT's for the same adapter and items."""
    peft = {r.adapter: r.outputs for r in rows if r.deployment == "PyTorch + PEFT"}
    out = []
    for r in rows:
        ref = peft.get(r.adapter)
        if ref is None or r.deployment.startswith("PyTorch"):
            out.append("")
            continue
        idx = r.items if r.items is not None else range(len(r.outputs))
        out.append(f"{sum(o == ref[i] for o, i in zip(r.outputs, idx))}/{len(r.outputs)}")
    return out


ROW_GROUPS = {
    "all": ["base", "peft", "merged", "inputs", "bank", *OPTIMIZED],
    "float": ["base", "peft", "merged", "inputs", "bank"],
    "quantized": ["peft", *OPTIMIZED],
}
ROW_NAMES = ["base", "peft", "merged", "inputs", "bank", *OPTIMIZED]


def parse_rows(text: str) -> list[str]:
    if text in ROW_GROUPS:
        return ROW_GROUPS[text]
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in ROW_NAMES]
    if bad or not names:
        raise SystemExit(
            f"error: --rows {text!r}: give {', '.join(ROW_GROUPS)} or a comma list of {', '.join(ROW_NAMES)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    ap.add_argument("--limit", type=int, default=None, help="score the first N records only")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--show", type=int, default=2, help="print this many generations per row")
    ap.add_argument(
        "--rows",
        default="all",
        help=f"{', '.join(ROW_GROUPS)} or a comma list of {', '.join(ROW_NAMES)} (inputs = branched)",
    )
    ap.add_argument(
        "--optimize-from",
        default="bank",
        choices=["bank", "merged"],
        help="the folder the fused/int8/int4 rows are optimized from: the bank folder of both adapters (float "
        "adapters on an optimized base) or each adapter's merged folder",
    )
    ap.add_argument("--work", type=Path, default=Path("score-work"), help="folder for the exported decoders")
    args = ap.parse_args(argv)
    wanted = parse_rows(args.rows)
    t0 = time.perf_counter()
    rows = peft_rows(args.split, args.limit, base="base" in wanted, peft="peft" in wanted)
    layouts = [x for x in ("merged", "inputs", "bank") if x in wanted]
    if layouts:
        rows += onnx_rows(args.split, args.limit, args.work, layouts)
    optimized = [x for x in OPTIMIZED if x in wanted]
    timings: dict[str, float] = {}
    if optimized:
        rows += optimized_rows(args.split, args.limit, args.work, optimized, args.optimize_from, timings)
    same = same_text(rows)
    table = task_run.markdown_table(rows, same_text=same if any(same) else None)
    for r in rows:
        for out in r.outputs[: args.show]:
            print(f"[{r.deployment} / {r.adapter}] {out}")
    print(table)
    for k, v in timings.items():
        print(f"{k}: {v:.1f} s")
    print(f"{len(rows)} rows on {rows[0].scores.n} {args.split} items in {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        data = [{**r.to_dict(), "same_text_as_peft": s} for r, s in zip(rows, same)]
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

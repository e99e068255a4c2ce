"""The paper-style task table for `sample:e2e`: generate on the test split, score BLEU / ROUGE-L / METEOR.

    python tools/score_sample.py                         # test split, every deployment available
    python tools/score_sample.py --split dev --limit 50 --markdown table.md --json table.json

Rows: the base model without adapter (scored against each task's references), PyTorch + PEFT for each
adapter (transformers `generate`, greedy), then the ONNX deployments `lora_export.verify.task_run` knows.
A deployment must not change the task score: the rows are printed side by side.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_export.models import e2e  # noqa: E402
from lora_export.verify import task_run  # noqa: E402


def peft_rows(split: str, limit: int | None) -> list[task_run.TaskRow]:
    from peft import PeftModel

    records = e2e.records(split)[:limit]
    prompts = [e2e.prompt(r.mr) for r in records]
    base = task_run.load_causal_lm(e2e.model_dir())
    rows = []
    for task in e2e.ADAPTERS:
        refs = [r.refs(task) for r in records]
        rows.append(
            task_run.evaluate(
                "PyTorch base (no adapter)", task, task_run.torch_generator(e2e.model_dir(), model=base), prompts, refs
            )
        )
    for task in e2e.ADAPTERS:
        refs = [r.refs(task) for r in records]
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(e2e.adapter_dir(task))).eval()
        rows.append(
            task_run.evaluate(
                "PyTorch + PEFT", task, task_run.torch_generator(e2e.model_dir(), model=model), prompts, refs
            )
        )
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
                rows.append(task_run.TaskRow("ONNX bank (mixed rows)", task, scores, [outputs[i] for i in idx]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    ap.add_argument("--limit", type=int, default=None, help="score the first N records only")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--show", type=int, default=2, help="print this many generations per row")
    ap.add_argument("--onnx", default="merged,inputs,bank", help="ONNX layouts to add ('' for none)")
    ap.add_argument("--work", type=Path, default=Path("score-work"), help="folder for the exported decoders")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = peft_rows(args.split, args.limit)
    layouts = [x for x in args.onnx.split(",") if x]
    if layouts:
        rows += onnx_rows(args.split, args.limit, args.work, layouts)
    table = task_run.markdown_table(rows)
    for r in rows:
        for out in r.outputs[: args.show]:
            print(f"[{r.deployment} / {r.adapter}] {out}")
    print(table)
    print(f"{len(rows)} rows on {rows[0].scores.n} {args.split} items in {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

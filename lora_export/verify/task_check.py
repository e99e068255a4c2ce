"""Score a decoder folder on the trained sample's task, next to PyTorch + PEFT on the same items.

`verify_task(model, folder, task="e2e")` generates (greedy) with the folder on a split of `sample:e2e`'s data
for each adapter the folder holds, generates the same items with PyTorch + PEFT (the shipped adapter
attached to the shipped base model, transformers `generate`), and scores both with BLEU / ROUGE-L / METEOR
(`verify.task`). Which adapters a folder holds:

- merged: the adapter folded into its weights, from its manifest (the baked one after `optimize --bake`),
  none for a base-model export; `adapters` names it when the manifest does not;
- inputs: each packed `adapters/NAME.onnx_adapter` whose NAME is one of the sample's adapters, by name;
- bank: the same, in ONE batch whose rows alternate the adapters (each adapter scored on its own rows).

Pass criteria: a float32 folder that is not quantized must generate the same text as PEFT on every item
(`mode` "exact"), except at a tie: an item whose text differs is re-generated alone by PEFT, and when PEFT's
own top-2 logits are within `TIE_MARGIN` at a step up to where the texts part (float32 rounding decides such
a step), or PEFT alone writes the folder's text, the item counts as a tie, not a failure. A quantized or fp16
folder passes when every score is within `tolerance` points (0-100 scale) of PEFT's on the same items
(`mode` "score"). Only the shipped sample has a task to score.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_export.contract import BANK, MERGED
from lora_export.errors import UserError
from lora_export.verify.task import TaskScores

TASKS = ("e2e",)
SPLITS = ("dev", "test")
DEFAULT_TOLERANCE = 1.0  # score points; quantized / fp16 folders
METRICS = ("bleu", "rouge_l", "meteor")
TIE_MARGIN = 1e-4  # logits: top-2 closer than this at float32 is a tie, either token is right
BASE = ""  # adapter name of the base model (a merged folder exported without an adapter)


@dataclass
class TaskComparison:
    """One adapter of the folder: its scores and PEFT's on the same items, and how many texts are equal."""

    adapter: str  # "" = the base model
    deployment: TaskScores
    reference: TaskScores
    same_text: int
    items: list[int] = field(default_factory=list)  # indices into the split
    first_difference: dict[str, Any] | None = None  # item, deployment text, reference text
    ties: list[int] = field(default_factory=list)  # differing items explained by a tie in PEFT's logits

    @property
    def n(self) -> int:
        return self.deployment.n

    def deltas(self) -> dict[str, float]:
        return {m: getattr(self.deployment, m) - getattr(self.reference, m) for m in METRICS}

    @property
    def max_delta(self) -> float:
        return max(abs(d) for d in self.deltas().values())

    def passed(self, mode: str, tolerance: float) -> bool:
        if mode == "exact":
            return self.same_text + len(self.ties) == self.n
        return self.max_delta <= tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "deployment": self.deployment.to_dict(),
            "reference": self.reference.to_dict(),
            "deltas": self.deltas(),
            "same_text": self.same_text,
            "ties": self.ties,
            "items": self.n,
            "first_difference": self.first_difference,
        }


@dataclass
class TaskReport:
    folder: str
    task: str
    split: str
    layout: str
    quantization: str | None
    dtype: str
    tolerance: float
    comparisons: list[TaskComparison] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mode(self) -> str:
        """exact: fp32 and not quantized, the text must equal PEFT's; score: within `tolerance` points."""
        return "exact" if self.quantization is None and self.dtype == "fp32" else "score"

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed(self.mode, self.tolerance) for c in self.comparisons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "task": self.task,
            "split": self.split,
            "layout": self.layout,
            "quantization": self.quantization,
            "dtype": self.dtype,
            "mode": self.mode,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "seconds": self.seconds,
            "comparisons": [{**c.to_dict(), "passed": c.passed(self.mode, self.tolerance)} for c in self.comparisons],
        }


def check_task_model(task: str, model: str) -> None:
    """One line when `task` is not known or `model` is not the sample the task belongs to."""
    from lora_export.models import e2e

    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if model != e2e.SPEC:
        raise UserError(f"--task {task} scores the trained sample: give {e2e.SPEC} as the model, not {model}")


def sample_adapter_name(name: str) -> str:
    """`description` or `sample:e2e/description` -> `description`; one line for anything else."""
    from lora_export.models import e2e

    short = name.split("/", 1)[1] if name.startswith(f"{e2e.SPEC}/") else name
    if short not in e2e.ADAPTERS:
        raise UserError(f"{name!r} is not an adapter of {e2e.SPEC}: the task scores {', '.join(e2e.adapter_specs())}")
    return short


def folder_adapters(folder, wanted: Sequence[str] = ()) -> list[str]:
    """The sample adapters `folder` (a `DecoderFolder`) holds, by name (see the module docstring)."""
    from lora_export.models import e2e

    wanted = [sample_adapter_name(w) for w in wanted]
    if folder_layout(folder) == MERGED:
        if len(wanted) > 1:
            raise UserError("a merged folder folds one adapter: give --adapter once (the one it was exported with)")
        if wanted:
            return wanted
        manifest = folder.manifest
        if manifest is None:
            raise UserError(f"{folder.path} has no manifest: say which adapter it folds with --adapter")
        baked = (manifest.optimized or {}).get("options", {}).get("bake")
        names = [baked] if baked else [a.get("name") for a in manifest.adapters]
        if not names:
            return [BASE]
        if len(names) > 1:
            raise UserError(f"{folder.path} names several adapters in its manifest: say which it folds with --adapter")
        return [sample_adapter_name(names[0])]
    held = [n for n in folder.adapter_files if n in e2e.ADAPTERS]
    if wanted:
        missing = [w for w in wanted if w not in folder.adapter_files]
        if missing:
            holds = ", ".join(folder.adapter_files) or "none"
            raise UserError(f"{folder.path} has no adapter {', '.join(missing)} (it holds: {holds})")
        return wanted
    if not held:
        raise UserError(
            f"{folder.path} holds none of {e2e.SPEC}'s adapters ({', '.join(e2e.ADAPTERS)}) under adapters/: "
            "export it with --adapter sample:e2e/description (and/or review)"
        )
    return held


def folder_layout(folder) -> str:
    """merged / inputs / bank of a `DecoderFolder`: from its manifest, else from its graph's LoRA inputs (a folder
    baked by `optimize --bake` has a plain `merged` manifest)."""
    if folder.layout is not None:
        return folder.layout
    from lora_export.artifacts.onnxio import read_slots

    return read_slots(folder.model_path).layout


def verify_task(
    model: str,
    folder: str | Path,
    *,
    task: str = "e2e",
    split: str = "test",
    limit: int | None = None,
    adapters: Sequence[str] = (),
    tolerance: float | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    threads: int | None = None,
    step: Callable[[str], AbstractContextManager[Any]] | None = None,
) -> TaskReport:
    """Task scores of `folder` vs PyTorch + PEFT on `split` (the first `limit` items); see the module docstring."""
    import contextlib

    from lora_export.artifacts.decoder_folder import read_folder
    from lora_export.models import e2e
    from lora_export.passes.quantize import graph_scheme
    from lora_export.verify import task_run

    step = step or (lambda _label: contextlib.nullcontext())
    check_task_model(task, model)
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not shipped: choose {' or '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: score at least 1 item")
    if tolerance is not None and tolerance < 0:
        raise UserError(f"--tolerance {tolerance}: give a number of score points >= 0")
    if not Path(folder).is_dir():
        raise UserError(f"--task scores a decoder folder (export-decoder): {folder} is not a folder")
    dec = read_folder(folder)
    source = (dec.manifest.model or {}).get("source") if dec.manifest is not None else None
    if source is not None and source != e2e.SPEC:
        raise UserError(f"{folder} was exported from {source}, not {e2e.SPEC}: the {task} task scores {e2e.SPEC}")
    names = folder_adapters(dec, adapters)
    layout = folder_layout(dec)
    dtype = (dec.manifest.dtype if dec.manifest is not None else "fp32") or "fp32"
    report = TaskReport(
        str(folder), task, split, layout, graph_scheme(dec.model_path), dtype,
        DEFAULT_TOLERANCE if tolerance is None else float(tolerance),
    )  # fmt: skip
    t0 = time.perf_counter()
    records = e2e.records(split)[:limit]
    prompts = [e2e.prompt(r.mr) for r in records]
    tok = task_run.load_tokenizer(e2e.model_dir())
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    with step(f"generating {len(prompts)} {split} items with {Path(folder).name} ({layout}, ONNX Runtime)"):
        if layout == BANK and len(names) > 1:  # one batch, rows alternate the adapters
            rows = [names[i % len(names)] for i in range(len(prompts))]
            mixed = task_run.onnx_generator(folder, tok, adapters=rows, threads=threads, **kw)(prompts)
            ours = {n: {i: mixed[i] for i, r in enumerate(rows) if r == n} for n in names}
        else:
            ours = {}
            for n in names:
                run_with = None if layout == MERGED else (n or None)  # a merged folder's adapter is folded in
                gen = task_run.onnx_generator(folder, tok, adapter=run_with, threads=threads, **kw)
                ours[n] = dict(enumerate(gen(prompts)))
    with step(f"the same items in PyTorch + PEFT ({', '.join(n or 'base' for n in names)})"):
        base = task_run.load_causal_lm(e2e.model_dir())
        for n in names:
            items = sorted(ours[n])
            ref_model = base if n == BASE else _peft_model(base, n)
            ref = task_run.torch_generator(e2e.model_dir(), model=ref_model, **kw)([prompts[i] for i in items])
            got = [ours[n][i] for i in items]
            scoring = n or e2e.ADAPTERS[0]  # the base model is scored against the first task's references
            refs = [records[i].refs(scoring) for i in items]
            differing = [k for k, (a, b) in enumerate(zip(got, ref)) if a != b]
            ties = [items[k] for k in differing if _is_tie(ref_model, tok, prompts[items[k]], got[k], max_new_tokens)]
            diff = next((k for k in differing if items[k] not in ties), differing[0] if differing else None)
            report.comparisons.append(
                TaskComparison(
                    n,
                    task_run.score(got, refs),
                    task_run.score(ref, refs),
                    sum(a == b for a, b in zip(got, ref)),
                    items,
                    None if diff is None else {"item": items[diff], "deployment": got[diff], "reference": ref[diff]},
                    ties,
                )
            )
    report.seconds = time.perf_counter() - t0
    return report


def _peft_model(base, name: str):
    from peft import PeftModel

    from lora_export.models import e2e

    return PeftModel.from_pretrained(copy.deepcopy(base), str(e2e.adapter_dir(name))).eval()


def _is_tie(model, tok, prompt: str, text: str, max_new_tokens: int) -> bool:
    """Whether PEFT (`model`), generating `prompt` alone, writes `text` or passes a top-2 logit gap below
    TIE_MARGIN at or before the step where its text stops agreeing with `text`."""
    import torch

    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, ids.shape[1] :].tolist()
    alone = tok.decode(new, skip_special_tokens=True).strip()
    if alone == text:
        return True
    common = next((i for i, (a, b) in enumerate(zip(alone, text)) if a != b), min(len(alone), len(text)))
    for step, scores in enumerate(out.scores):
        top = torch.topk(scores[0].float(), 2).values
        if float(top[0] - top[1]) < TIE_MARGIN:
            return True
        if len(tok.decode(new[: step + 1], skip_special_tokens=True).strip()) > common:
            return False  # this step wrote the first character where the texts part
    return False

"""Generate on a data split and score it: one row of the task table per deployment (base, PyTorch, ONNX ...).

A deployment is a `TextGenerator`: prompts in, generated continuations out (greedy, stopping at the
end-of-text token). `torch_generator` is the PyTorch reference: transformers `generate` on the base model
with the adapter attached unmerged (`lora_export`'s LoRA layer, PEFT's forward: `W0·x + s·B·(A·x)`), or on a
PEFT model when one is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_export.verify.task import TaskScores, score

__all__ = ["TaskRow", "TaskScores", "evaluate", "markdown_table", "onnx_generator", "score", "torch_generator"]

TextGenerator = Callable[[Sequence[str]], list[str]]


@dataclass
class TaskRow:
    deployment: str
    adapter: str  # "" for the base model
    scores: TaskScores
    outputs: list[str] = field(repr=False, default_factory=list)
    items: list[int] | None = field(repr=False, default=None)  # indices into the split when not all of it

    def to_dict(self) -> dict:
        return {"deployment": self.deployment, "adapter": self.adapter, **self.scores.to_dict()}


def evaluate(
    deployment: str, adapter: str, generate: TextGenerator, prompts: Sequence[str], references: Sequence[Sequence[str]]
) -> TaskRow:
    outputs = generate(prompts)
    return TaskRow(deployment, adapter, score(outputs, references), outputs)


def load_tokenizer(model_dir: str | Path):
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tok.padding_side = "left"
    return tok


def load_causal_lm(model_dir: str | Path):
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def torch_generator(
    model_dir: str | Path,
    adapter=None,
    *,
    model=None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
) -> TextGenerator:
    """Greedy `generate` on the base model, with `adapter` (a path or `Adapter`) attached unmerged.

    `model` replaces the loaded base (a PEFT model, say); then `adapter` must be None.
    """
    from lora_export.adapters.inject import attach_adapter

    tok = load_tokenizer(model_dir)
    if model is None:
        model = load_causal_lm(model_dir)
        if adapter is not None:
            from lora_export.models.sources import open_adapter

            attach_adapter(model, open_adapter(adapter))
    return lambda prompts: generate_text(model, tok, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)


def generate_text(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 32, max_new_tokens: int = 64):
    """Greedy continuations of `prompts` (left-padded batches), decoded without special tokens."""
    import torch

    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = ids[:, enc["input_ids"].shape[1] :]
        out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def onnx_generator(
    folder: str | Path,
    tokenizer,
    *,
    adapter: str | None = None,
    adapters: Sequence[str | None] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    threads: int | None = None,
) -> TextGenerator:
    """Greedy generation on a decoder folder (`export-decoder`) with ONNX Runtime (`runtime.Generator`).

    `adapter` names one of the folder's adapters for every prompt; `adapters` gives one per prompt (a bank
    folder mixes them in one batch; the list repeats over the prompts).
    """
    from lora_export.runtime.generator import Generator

    gen = Generator(folder, threads=threads)
    eos = tokenizer.eos_token_id

    def run(prompts: Sequence[str]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            ids = [tokenizer(p)["input_ids"] for p in chunk]
            rows = None if adapters is None else [adapters[(i + k) % len(adapters)] for k in range(len(chunk))]
            result = gen.generate(
                ids, adapter=adapter, adapters=rows, max_new_tokens=max_new_tokens, stop_token_ids=[eos]
            )
            out.extend(tokenizer.decode([t for t in toks if t != eos]).strip() for toks in result.tokens)
        return out

    return run


def markdown_table(rows: Sequence[TaskRow], same_text: Sequence[str] | None = None) -> str:
    """The task table; `same_text` adds a column (one entry per row, e.g. "200/200" texts equal to PEFT's)."""
    variant = rows[0].scores.meteor_variant if rows else ""
    head = f"| deployment | adapter | BLEU | ROUGE-L | METEOR ({variant}) | items |"
    rule = "|---|---|---:|---:|---:|---:|"
    if same_text is not None:
        head, rule = head + " same text as PEFT |", rule + "---:|"
    lines = [head, rule]
    for k, r in enumerate(rows):
        s = r.scores
        line = f"| {r.deployment} | {r.adapter or '(none)'} | {s.bleu:.1f} | {s.rouge_l:.1f} | {s.meteor:.1f} | {s.n} |"
        lines.append(line + (f" {same_text[k]} |" if same_text is not None else ""))
    return "\n".join(lines)

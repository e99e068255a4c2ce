"""Train the `sample:e2e` model and its two LoRA adapters from seeds, deterministically, on CPU.

Its command line is `tools/train_sample.py` (`-o DIR`, `--tiny`, `--check`).

Steps, each a pure function of the seeds:

1. the synthetic E2E-style splits (`lora_export.models.e2e.data`), written as `data/{train,dev,test}.jsonl`;
2. a byte-level BPE tokenizer trained with `tokenizers` on generic text plus the training split, saved as a
   transformers fast tokenizer (`tokenizer.json`, `tokenizer_config.json`);
3. a tiny GPT-2 pre-trained on generic synthetic English only (no meaning representation in it);
4. two LoRA adapters trained with PEFT on the frozen base (r=8, alpha=16 on `c_attn`, the attention
   projections, as the LoRA paper adapts Wq/Wv): MR -> description and MR -> short review. The loss covers
   the target text only, as in the paper.

Same seeds and thread count -> the same file hashes (`--check` runs twice and compares). The printed timings
are wall-clock on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from lora_export.artifacts.fileio import sha256_file
from lora_export.models.e2e import data as e2e_data

ENVIRONMENT = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
SHIPPED = Path(__file__).resolve().parent / "files"  # the shipped sample

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 7
    data: e2e_data.DataConfig = e2e_data.DataConfig()
    pretrain_docs: int = 30000
    vocab_size: int = 1024
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    block: int = 64
    pretrain_steps: int = 400
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_steps: int = 700
    lora_batch: int = 32
    lora_lr: float = 5e-3
    threads: int = 1


TINY = TrainConfig(
    data=e2e_data.DataConfig(train=60, dev=8, test=8),
    pretrain_docs=300,
    vocab_size=400,
    n_layer=1,
    n_embd=32,
    n_head=2,
    pretrain_steps=4,
    pretrain_batch=4,
    lora_steps=3,
    lora_batch=4,
    threads=1,
)


def deterministic(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


# --- tokenizer ------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], cfg: TrainConfig, out_dir: Path):
    """A byte-level BPE (GPT-2's scheme) with one special token, `<|endoftext|>` = id 0 (bos = eos = pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=cfg.n_positions
    )
    fast.save_pretrained(str(out_dir))
    # GPT-2's class name: transformers 4 and 5 and ONNX Runtime GenAI's tokenizer all read it as this BPE.
    cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=False, add_bos_token=False)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    return fast


# --- base model -----------------------------------------------------------------------------------------------


def build_base(cfg: TrainConfig, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def pretrain(model, tokenizer, docs: list[str], cfg: TrainConfig, log=print) -> float:
    """Next-token loss on the generic corpus packed into `block`-token rows; returns the last loss."""
    ids: list[int] = []
    for doc_ids in tokenizer(docs)["input_ids"]:
        ids.extend(doc_ids + [tokenizer.eos_token_id])
    n_rows = len(ids) // cfg.block
    stream = torch.tensor(ids[: n_rows * cfg.block]).view(n_rows, cfg.block)  # (rows, block)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, cfg.pretrain_steps)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(cfg.pretrain_steps):
        if step and step % 100 == 0:
            log(f"  pretrain step {step}/{cfg.pretrain_steps}: loss {float(loss.detach()):.3f}")
        rows = torch.randint(0, n_rows, (cfg.pretrain_batch,), generator=gen)
        batch = stream[rows]  # (B, block)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def _warmup_cosine(opt, steps: int):
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + torch.cos(torch.tensor((step - warm) / max(1, steps - warm) * torch.pi)).item())

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --- adapters -------------------------------------------------------------------------------------------------


def task_examples(tokenizer, records, task: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids + eos) for every reference of every record."""
    prompts = tokenizer([e2e_data.prompt(r.mr) for r in records])["input_ids"]
    refs = [list(r.refs(task)) for r in records]
    targets = iter(tokenizer([ref for rs in refs for ref in rs])["input_ids"])
    return [(p, next(targets) + [tokenizer.eos_token_id]) for p, rs in zip(prompts, refs) for _ in rs]


def train_adapter(base, tokenizer, records, task: str, cfg: TrainConfig, out_dir: Path, seed: int, log=print) -> float:
    """A PEFT LoRA on the frozen base; loss on the target tokens only. Writes a PEFT adapter directory."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    spec = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=["c_attn"],
        lora_dropout=0.0,
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, spec)
    examples = task_examples(tokenizer, records, task)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lora_lr, weight_decay=0.0)
    sched = _warmup_cosine(opt, cfg.lora_steps)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(cfg.lora_steps):
        if step and step % 100 == 0:
            log(f"  {task} step {step}/{cfg.lora_steps}: loss {float(loss.detach()):.3f}")
        batch = rng.sample(examples, min(cfg.lora_batch, len(examples)))
        input_ids, labels, mask = _pad_batch(batch, tokenizer.pad_token_id, cfg.n_positions)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(str(out_dir))
    _normalize_adapter_dir(out_dir)
    base = model.unload()  # the same base object, LoRA layers removed, for the next adapter
    return float(loss.detach())


def _pad_batch(batch, pad_id: int, max_len: int):
    seqs = [(p + t)[:max_len] for p, t in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, ((p, _), s) in enumerate(zip(batch, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
        mask[i, : len(s)] = 1
    return ids, labels, mask


def _normalize_adapter_dir(out_dir: Path) -> None:
    """No local path in the config and no generated model card: the directory is the same on any machine."""
    (out_dir / "README.md").unlink(missing_ok=True)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "sample:e2e"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --- the whole pipeline ---------------------------------------------------------------------------------------


def quiet_environment() -> None:
    """The environment training runs in (no tokenizer threads, offline, quiet; deterministic cuBLAS), unless set."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    transformers.utils.logging.disable_progress_bar()


def train_all(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), log=print) -> dict:
    """Write data/, model/, adapters/{description,review}/ under `out_dir`; return timings and losses."""
    quiet_environment()
    from transformers import GenerationConfig

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    deterministic(cfg.seed, cfg.threads)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    splits = e2e_data.make_splits(cfg.data)
    e2e_data.write_splits({k: v for k, v in splits.items() if k != "train"}, out / "data")
    docs = e2e_data.pretraining_corpus(cfg.pretrain_docs, cfg.seed)
    task_text = [e2e_data.prompt(r.mr) + ref for r in splits["train"] for t in e2e_data.TASKS for ref in r.refs(t)]
    model_dir = out / "model"
    tokenizer = train_tokenizer(docs + task_text, cfg, model_dir)
    times["data+tokenizer"] = time.perf_counter() - t0
    log(f"tokenizer: {len(tokenizer)} tokens ({times['data+tokenizer']:.1f} s)")

    t = time.perf_counter()
    model = build_base(cfg, len(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    pre_loss = pretrain(model, tokenizer, docs, cfg, log)
    times["pretrain"] = time.perf_counter() - t
    log(f"base: {n_params / 1e6:.2f} M parameters, loss {pre_loss:.3f} ({times['pretrain']:.1f} s)")
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False, max_new_tokens=64
    )
    model.save_pretrained(str(model_dir))

    losses = {"pretrain": pre_loss}
    for i, task in enumerate(e2e_data.TASKS):
        t = time.perf_counter()
        losses[task] = train_adapter(
            model, tokenizer, splits["train"], task, cfg, out / "adapters" / task, seed=cfg.seed + 1 + i, log=log
        )
        times[task] = time.perf_counter() - t
        log(f"adapter {task}: loss {losses[task]:.3f} ({times[task]:.1f} s)")
    times["total"] = time.perf_counter() - t0
    return {"times": times, "losses": losses, "parameters": n_params, "config": dataclasses.asdict(cfg)}


def tree_hashes(root: str | Path) -> dict[str, str]:
    root = Path(root)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}

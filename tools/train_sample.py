"""Train the `sample:e2e` model and its two LoRA adapters from seeds, deterministically, on CPU.

    python tools/train_sample.py                 # writes lora_export/models/e2e/files/ (the shipped sample)
    python tools/train_sample.py -o /tmp/e2e --tiny   # a seconds-long run of the same pipeline

The training is `lora_export.models.e2e.train`; this is its command line. Steps, each a pure function of
the seeds:

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

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from lora_export.models.e2e.train import SHIPPED, TINY, TrainConfig, train_all, tree_hashes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    default_out = SHIPPED
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long configuration (tests)")
    ap.add_argument("--threads", type=int, help="torch threads (default 2; 1 for --tiny)")
    ap.add_argument("--check", action="store_true", help="train twice and compare file hashes")
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else TrainConfig()
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    result = train_all(args.out, cfg)
    print(json.dumps({"times_s": {k: round(v, 1) for k, v in result["times"].items()}, "losses": result["losses"]}))
    if args.check:
        first = tree_hashes(args.out)
        again = args.out.with_name(args.out.name + ".check")
        train_all(again, cfg, log=lambda *_: None)
        second = tree_hashes(again)
        shutil.rmtree(again)
        diff = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
        print("deterministic: same hashes" if not diff else f"NOT deterministic: {diff}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

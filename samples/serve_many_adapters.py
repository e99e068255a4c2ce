"""One branched graph, many adapters: swap per request, or mix adapters inside one batch.

    python samples/serve_many_adapters.py [--model sample:gpt2] [--workdir /tmp/lora-serving]

Replace the random adapters with your PEFT adapter directories (adapter_config.json +
adapter_model.safetensors) and the sample with your local transformers directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lora_export import api
from lora_export.runtime import LoraSession


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sample:gpt2")
    p.add_argument("--workdir", type=Path, default=Path("lora-serving"))
    args = p.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = api.as_model(args.model)

    # 1. adapters: here random ones with non-zero B; in real use, your fine-tuned PEFT directories
    names = ["support", "legal", "code"]
    for seed, name in enumerate(names):
        api.make_adapter(model, work / name, r=4 * (seed + 1), alpha=16, seed=seed, force=True)

    # 2. two graphs, exported once: per-request swapping, and per-row mixing
    api.export_branched(model, work / "branched.onnx", adapters=[work / n for n in names], force=True)
    api.export_branched(model, work / "bank.onnx", adapters=[work / n for n in names], layout="bank", force=True)

    feeds = {k: v.numpy() for k, v in model.make_inputs(3, 12, 0).items()}

    # 3. swap per request: no session rebuild, ~microseconds per switch
    with LoraSession(work / "branched.onnx") as session:
        for name in names:
            session.load_adapter(name, work / name)
        base = session.run(feeds)[model.output_names[0]]
        for name in names:
            out = session.run(feeds, adapter=name)[model.output_names[0]]
            print(f"{name:>8}: max |adapter - base| = {np.abs(out - base).max():.4f}")

    # 4. mix adapters per batch row in one call (None = the base model for that row)
    with LoraSession(work / "bank.onnx") as session:
        for name in names:
            session.load_adapter(name, work / name)
        rows = ["legal", None, "code"]
        mixed = session.run(feeds, adapters=rows)[model.output_names[0]]
        print(f"mixed batch {rows}: output {mixed.shape}")


if __name__ == "__main__":
    main()

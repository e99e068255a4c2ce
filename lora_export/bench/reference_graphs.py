"""The committed reference graphs (graphs/ of the repository: the tiny GPT-2 sample), regenerated deterministically.

Everything is seeded (the sample's weights, the adapter, the export's example inputs). Graphs are compared byte
for byte; the JSON manifests beside them hold timestamps and versions, so they are not committed.
`tools/regen_graphs.py` is the command line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SEED = 0
RANK, ALPHA = 4, 8.0
FILES = [
    "adapter.onnx_adapter",
    "merged.onnx",
    "merged.opt.onnx",
    "branched_inputs.onnx",
    "branched_inputs.opt.onnx",
    "branched_bank.onnx",
    "branched_bank.opt.onnx",
]


def regenerate(out: Path) -> list[Path]:
    """Write the reference graphs into `out` (manifests go to a scratch dir); returns the files written."""
    import torch

    from lora_export.adapters.pack import pack_adapter
    from lora_export.adapters.spec import LoraSpec
    from lora_export.adapters.synthetic import random_adapter
    from lora_export.bench.standard_graphs import export_standard_graphs
    from lora_export.models import load_model
    from lora_export.passes.pipeline import optimize_file

    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("sample:gpt2")
    adapter = random_adapter(
        loaded.module, LoraSpec(r=RANK, alpha=ALPHA, target_modules=["c_attn"]), seed=SEED, name="reference"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pack_adapter(adapter, tmp / "adapter.onnx_adapter")
        names = {"merged": "merged.onnx", "branched": "branched_inputs.onnx", "bank": "branched_bank.onnx"}
        export_standard_graphs(loaded, tmp, adapter, kinds=["merged", "branched", "bank"], names=names, bank_max_rank=8)
        for stem in ("merged", "branched_inputs", "branched_bank"):
            optimize_file(tmp / f"{stem}.onnx", tmp / f"{stem}.opt.onnx")
        written = []
        for name in FILES:
            (out / name).write_bytes((tmp / name).read_bytes())
            written.append(out / name)
    return written


def compare(a: Path, b: Path) -> list[str]:
    """Names of reference files that differ between two directories."""
    return [
        n
        for n in FILES
        if not (a / n).is_file() or not (b / n).is_file() or (a / n).read_bytes() != (b / n).read_bytes()
    ]

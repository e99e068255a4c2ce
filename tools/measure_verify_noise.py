"""Measure the honest fp32 parity error of our exports, and what a one-weight corruption looks like.

For every model (the sample zoo, a tied-embedding Llama, a `py:` factory; `--large` adds GPT-2 small) and
every export kind (base, merged, branched inputs, bank), ONNX Runtime CPU is compared with the PyTorch
reference on the verify harness's seeds and shapes. Per output it records the max abs error, the output's
scale (max |reference|) and the error relative to that scale (`max_abs / max|ref|`). Then, for each merged
graph, one element of the first adapted weight is changed by +1e-2 and the same numbers are taken: that
is the corruption `verify` must catch.

    python tools/measure_verify_noise.py [--large] [--json out.json]

The fp32 tolerance in `lora_export.verify.tolerance` (used by `verify` and the decoder check) comes from this
distribution (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
warnings.simplefilter("ignore")

SHAPES = [(2, 16), (3, 7), (1, 23), (4, 64)]
SEEDS = [0, 1, 2]
EDIT = 1e-2


def _models(large: bool, only: list[str] | None = None):
    import torch
    import transformers

    from lora_export.models import load_model
    from lora_export.models.loading import wrap_transformers
    from lora_export.models.zoo import SAMPLES

    names = ["gpt2", "llama", "bert", "convnet", "llama-tied", "py:tiny_factory"] + (["gpt2-small"] if large else [])
    out = {}
    for name in only or names:
        if name == "llama-tied":
            torch.manual_seed(0)
            cfg = transformers.LlamaConfig(**SAMPLES["llama"].config, tie_word_embeddings=True)
            out[name] = wrap_transformers(transformers.LlamaForCausalLM(cfg).eval(), name)
        elif name == "py:tiny_factory":
            out[name] = load_model("py:tiny_factory:make")
        else:
            out[name] = load_model(f"sample:{name}")
    return out


def _targets(name: str, loaded) -> list[str]:
    from lora_export.adapters.spec import DEFAULT_TARGETS

    if name == "convnet":
        return ["conv1", "conv2"]
    if name == "py:tiny_factory":
        return ["proj"]
    targets = list(DEFAULT_TARGETS[loaded.arch])
    return targets + (["lm_head"] if name in ("gpt2", "llama-tied") else [])


def _stats(ref: dict, got: dict) -> dict[str, dict]:
    out = {}
    for k, r in ref.items():
        r64, g64 = np.asarray(r, np.float64), np.asarray(got[k], np.float64)
        err = float(np.abs(r64 - g64).max())
        scale = float(np.abs(r64).max())
        out[k] = {"max_abs": err, "scale": scale, "rel_to_scale": err / max(scale, 1e-30)}
    return out


def _rows_with_scale(loaded, graph, adapters, shapes) -> list[dict]:
    """max abs error and max |ref| per case (the harness's rel is per element; recompute the scale here)."""
    from lora_export.backends.onnxrt import OrtRunner
    from lora_export.verify.check import TorchSide, make_feeds

    rows = []
    with TorchSide(loaded, list(adapters[:1])) as ref_side, OrtRunner(graph) as ort_runner:
        from lora_export.contract import SlotTable

        slots = SlotTable.from_session(ort_runner.session)
        extra = slots.adapter_feeds(adapters[0]) if adapters and slots.layout == "inputs" else {}
        for seed in SEEDS:
            for b, s in shapes:
                feeds = make_feeds(loaded, b, s, seed)
                ref = ref_side.outputs(feeds, None)
                got = ort_runner.infer({**feeds, **extra})
                for k, st in _stats(ref, got).items():
                    rows.append({"case": f"seed={seed} {b}x{s}", "output": k, **st})
    return rows


def _edit_first_weight(graph: Path, out: Path, module: str) -> str:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    name = f"{module}.weight"
    for t in model.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            arr.flat[arr.size // 3] += EDIT
            t.CopyFrom(numpy_helper.from_array(arr, name))
            onnx.save(model, str(out))
            return name
    raise SystemExit(f"{graph} has no initializer {name}")


def measure(large: bool, only: list[str] | None = None) -> dict:
    from conftest import make_random_adapter

    from lora_export.export.branched import export_branched
    from lora_export.export.merged import export_merged

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, loaded in _models(large, only).items():
            t0 = time.perf_counter()
            shapes = SHAPES if loaded.arch != "convnet" else [(2, 16), (3, 8), (1, 24)]
            if loaded.arch == "py":
                shapes = [(2, 0), (3, 0), (1, 0)]
            adapter = make_random_adapter(loaded, targets=_targets(name, loaded), seed=7)
            res: dict[str, list] = {}
            base = tmp / f"{name}_base.onnx"
            export_merged(loaded, None, base)
            res["base"] = _rows_with_scale(loaded, base, [], shapes)
            merged = tmp / f"{name}_merged.onnx"
            export_merged(loaded, adapter, merged)
            res["merged"] = _rows_with_scale(loaded, merged, [adapter], shapes)
            if loaded.arch != "convnet":
                br = tmp / f"{name}_inputs.onnx"
                export_branched(loaded, br, adapters=[adapter])
                res["branched"] = _rows_with_scale(loaded, br, [adapter], shapes)
            module = next((m for m in sorted(adapter.modules) if "lm_head" not in m), sorted(adapter.modules)[0])
            edited = tmp / f"{name}_edited.onnx"
            _edit_first_weight(merged, edited, module)
            res["one_weight_edit"] = _rows_with_scale(loaded, edited, [adapter], shapes)
            res["edited_module"] = module
            results[name] = res
            print(f"{name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return results


def summarize(results: dict) -> dict:
    honest = [r for res in results.values() for k in ("base", "merged", "branched") for r in res.get(k, [])]
    edits = {name: res["one_weight_edit"] for name, res in results.items()}

    def q(values, p):
        return float(np.percentile(values, p)) if values else float("nan")

    abs_err = [r["max_abs"] for r in honest]
    rel = [r["rel_to_scale"] for r in honest]
    out = {
        "honest_cases": len(honest),
        "honest_max_abs": {"p50": q(abs_err, 50), "p99": q(abs_err, 99), "max": max(abs_err)},
        "honest_rel_to_scale": {"p50": q(rel, 50), "p99": q(rel, 99), "max": max(rel)},
        "honest_worst_by_model": {
            name: max(r["max_abs"] for k in ("base", "merged", "branched") for r in res.get(k, []))
            for name, res in results.items()
        },
        "edited_module": {name: res["edited_module"] for name, res in results.items()},
        # what verify sees: it fails when any case is out of tolerance, so the largest error over the cases
        "edit_max_abs_by_model": {name: max(r["max_abs"] for r in rows) for name, rows in edits.items()},
        "edit_max_rel_by_model": {name: max(r["rel_to_scale"] for r in rows) for name, rows in edits.items()},
        "edit_min_abs_by_model": {name: min(r["max_abs"] for r in rows) for name, rows in edits.items()},
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also GPT-2 small (real shape, random weights)")
    ap.add_argument("--only", default=None, help="comma-separated model names (default: all)")
    ap.add_argument("--json", default=None, help="write every measurement to this file")
    args = ap.parse_args()
    results = measure(args.large, args.only.split(",") if args.only else None)
    summary = summarize(results)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

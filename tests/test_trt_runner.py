"""TensorRT end to end (build, run, refit X -> Y -> X): runs only where TensorRT and a CUDA GPU exist.

Everywhere else every test here skips with the one-line reason the commands print (exit code 3).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_random_adapter

from lora_export.engines._trt import unavailable_reason

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def gpt2(sample_cache, tmp_path_factory):
    from lora_export.backends.torch_runner import TorchRunner
    from lora_export.export.branched import export_branched
    from lora_export.export.merged import export_merged
    from lora_export.verify.check import make_feeds

    root = tmp_path_factory.mktemp("trt")
    loaded = sample_cache("gpt2")
    x = make_random_adapter(loaded, r=4, targets=["c_attn"], seed=1, name="x")
    y = make_random_adapter(loaded, r=8, targets=["c_attn", "c_fc"], seed=2, name="y")
    feeds = [make_feeds(loaded, 2, 16, 0), make_feeds(loaded, 1, 23, 1)]
    ref = {}
    for label, ad in (("none", None), ("x", x), ("y", y)):
        with TorchRunner(loaded, ad) as r:
            ref[label] = [r.infer(f) for f in feeds]
    graphs = {
        "base": export_merged(loaded, None, root / "base.onnx").path,
        "x": export_merged(loaded, x, root / "x.onnx").path,
        "branched": export_branched(loaded, root / "b.onnx", adapters=[x]).path,
        "branched_xy": export_branched(loaded, root / "bxy.onnx", adapters=[x, y]).path,
    }
    return dict(root=root, x=x, y=y, feeds=feeds, ref=ref, graphs=graphs)


def _check(plan, s, want, extra=None, atol=2e-2):
    from lora_export.backends.trt import TrtRunner

    with TrtRunner(plan) as r:
        for f, ref in zip(s["feeds"], s["ref"][want]):
            got = r.infer({**f, **(extra or {})})
            np.testing.assert_allclose(got["logits"], ref["logits"], atol=atol, rtol=1e-2)


def test_merged_engine_refit_x_y_x_and_back_to_base(gpt2):
    from lora_export.artifacts.plan_manifest import PlanManifest
    from lora_export.engines.build import BuildOptions, build_engine
    from lora_export.engines.refit import refit_engine

    root = gpt2["root"]
    built = build_engine(
        gpt2["graphs"]["x"], root / "m.plan", BuildOptions(refit=True, base_graph=gpt2["graphs"]["base"]), force=True
    )
    m = PlanManifest.read(built.path)
    assert m.refittable and "transformer.h.0.attn.c_attn.weight" in m.refittable_weights
    assert sorted(m.current_weights) == sorted(f"{p}.weight" for p in gpt2["x"].modules)
    _check(built.path, gpt2, "x")
    current = built.path
    for k, (label, ad) in enumerate((("y", gpt2["y"]), ("x", gpt2["x"]), ("none", None))):
        result = refit_engine(current, ad, out=root / f"m{k}.plan", force=True)
        assert result.refit_seconds > 0
        _check(result.path, gpt2, label)
        current = result.path
    assert PlanManifest.read(current).current_weights == []


def test_branched_engine_with_lora_inputs(gpt2):
    from lora_export.engines.build import build_engine

    built = build_engine(gpt2["graphs"]["branched"], gpt2["root"] / "b.plan", force=True)
    names = {i["name"] for i in built.manifest.io["inputs"]}
    assert "transformer.h.0.attn.c_attn.lora_A.weight" in names
    _check(built.path, gpt2, "x", gpt2["x"].contract_tensors())
    _check(built.path, gpt2, "none")  # LoRA inputs left out: bound at rank 0


def test_branched_engine_with_lora_weights_refits(gpt2):
    from lora_export.engines.build import BuildOptions, build_engine
    from lora_export.engines.refit import refit_engine

    root = gpt2["root"]
    opts = BuildOptions(refit=True, lora_as="weights", lora_rank=8)
    built = build_engine(gpt2["graphs"]["branched_xy"], root / "w.plan", opts, force=True)
    _check(built.path, gpt2, "none")
    current = built.path
    for k, (label, ad) in enumerate((("x", gpt2["x"]), ("y", gpt2["y"]), ("x", gpt2["x"]))):
        current = refit_engine(current, ad, out=root / f"w{k}.plan", force=True).path
        _check(current, gpt2, label)


def test_runner_prepare_run_synchronize_and_cuda_graph(gpt2):
    from lora_export.backends.trt import TrtRunner
    from lora_export.engines.build import build_engine

    plan = build_engine(gpt2["graphs"]["x"], gpt2["root"] / "g.plan", force=True).path
    for cuda_graph in (False, True):
        with TrtRunner(plan, cuda_graph=cuda_graph) as r:
            handles = [r.prepare(f) for f in gpt2["feeds"]]
            for h, ref in zip(handles, gpt2["ref"]["x"]):
                r.run_prepared(h)
                r.synchronize()
                np.testing.assert_allclose(h.outputs["logits"].float().cpu().numpy(), ref["logits"], atol=2e-2)
            assert len(r.elapsed_ms(handles[0], iters=3, warmup=1)) == 3


def test_timing_cache_is_written_and_reused(gpt2, tmp_path):
    from lora_export.engines.build import BuildOptions, build_engine

    cache = tmp_path / "timing.cache"
    build_engine(gpt2["graphs"]["base"], tmp_path / "a.plan", BuildOptions(timing_cache=cache), force=True)
    assert cache.stat().st_size > 0
    build_engine(gpt2["graphs"]["base"], tmp_path / "b.plan", BuildOptions(timing_cache=cache), force=True)

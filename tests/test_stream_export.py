"""Streamed export: a weightless skeleton is traced and each weight is written once, straight from the checkpoint.

The oracle for the bytes is the in-memory export the streamed one replaced (`legacy_export` below: copy the
model, merge or wire the LoRA branch, trace the real weights, save): same graph file, byte for byte.
"""

from __future__ import annotations

import shutil
from collections import namedtuple

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import assert_one_line_error, run
from conftest import make_random_adapter
from peft_oracle import build_peft, peft_forward, save_adapter

from lora_export import api
from lora_export.adapters import read_adapter
from lora_export.adapters.inject import attach_feed, merge_adapter
from lora_export.adapters.layer import BranchFeed
from lora_export.artifacts import onnxio
from lora_export.artifacts.checkpoint import SafetensorsWeights
from lora_export.backends import torch_runner
from lora_export.backends.onnxrt import OrtRunner
from lora_export.contract import INPUTS
from lora_export.export import branched, stream
from lora_export.export import trace as trace_mod
from lora_export.export.branched import export_branched
from lora_export.export.merged import export_merged
from lora_export.models.loading import LoadedModel, load_model
from lora_export.models.skeleton import tensor_names
from lora_export.verify.check import make_feeds, verify_graph

ARCHS = ["gpt2", "llama", "bert"]
Pair = namedtuple("Pair", "legacy streamed reads writes adapter")


def legacy_export(loaded, adapter, out, kind):
    """The export as it was before streaming: a deep copy with real weights, merged or wired, then traced."""
    work = loaded.copy()
    if kind == "merged":
        merge_adapter(work.module, adapter)
        model = trace_mod.trace(work)
    else:
        paths = branched.resolve_targets(loaded, [adapter], None)
        extra = branched._inputs_layout(branched.lora_slots(loaded, paths, INPUTS), torch.float32)
        feed = BranchFeed(INPUTS)
        attach_feed(work.module, paths, feed)
        model = trace_mod.trace(work, extra=extra, feed=feed)
    trace_mod.save(model, out)
    return out


@pytest.fixture(scope="module")
def pairs(checkpoints, tmp_path_factory, sample_cache):
    """(arch, kind) -> the legacy graph and the streamed one (exported from the lazily loaded checkpoint)."""
    root = tmp_path_factory.mktemp("pairs")
    cache = {}

    def get(arch, kind):
        if (arch, kind) not in cache:
            adapter = make_random_adapter(sample_cache(arch), r=4, seed=11)
            lazy = load_model(str(checkpoints[arch]), lazy=True)
            assert all(p.is_meta for p in lazy.module.parameters())
            lazy.rebuild = _refuse_to_load
            sources, writes = [], []
            real_source = stream.weight_source
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD", 1024)  # weights in `.data`, as for large models
                legacy = root / f"{arch}_{kind}_old" / "m.onnx"
                legacy.parent.mkdir()
                legacy_export(load_model(str(checkpoints[arch])), adapter, legacy, kind)
                mp.setattr(stream, "weight_source", lambda m: sources.append(real_source(m)) or sources[-1])
                out = root / f"{arch}_{kind}_new" / "m.onnx"
                on_write = lambda *a: writes.append(a)  # noqa: E731
                if kind == "merged":
                    export_merged(lazy, adapter, out, on_write=on_write)
                else:
                    export_branched(lazy, out, adapters=[adapter], on_write=on_write)
            assert len(sources) == 1 and isinstance(sources[0], SafetensorsWeights)
            cache[arch, kind] = Pair(legacy, out, sources[0].reads, writes, adapter)
        return cache[arch, kind]

    return get


def _refuse_to_load():
    raise AssertionError("the export loaded the model's weights")


@pytest.mark.parametrize("kind", ["merged", "branched"])
@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_export_is_byte_identical_and_reads_each_tensor_once(pairs, sample_cache, arch, kind):
    pair = pairs(arch, kind)
    old, new = onnx.load(str(pair.legacy)), onnx.load(str(pair.streamed))
    assert [t.name for t in new.graph.initializer] == [t.name for t in old.graph.initializer]
    for a, b in zip(old.graph.initializer, new.graph.initializer):
        assert a.raw_data == b.raw_data, a.name
    for name in ("m.onnx", "m.onnx.data"):  # the whole graph, nodes and metadata too, and the weights file
        assert (pair.streamed.parent / name).read_bytes() == (pair.legacy.parent / name).read_bytes(), name
    # every weight the graph stores was read from the checkpoint (tied ones are stored once), none read twice;
    # the optimizer reads a few small tensors it then drops (zero biases), still once
    module = sample_cache(arch).module
    param_ids = {id(p) for p in module.parameters()}  # buffers come from the model, not the checkpoint
    groups = [set(names) for i, names in tensor_names(module).items() if i in param_ids]  # tied: one group
    params = set().union(*groups)
    stored = [next(g for g in groups if t.name in g) for t in new.graph.initializer if t.name in params]
    assert stored and [g for g in stored if not g & set(pair.reads)] == []  # each read under one of its names
    assert max(pair.reads.values()) == 1
    assert set(pair.reads) <= params


def test_progress_reports_bytes_up_to_the_total(pairs):
    writes = pairs("llama", "merged").writes
    done = [w[0] for w in writes]
    assert done == sorted(done) and writes[-1][0] == writes[-1][1] > 0
    assert any(name.endswith("q_proj.weight") for _, _, name in writes)


def test_verify_of_a_lazy_model_loads_it_once(pairs, checkpoints, monkeypatch):
    pair = pairs("llama", "merged")
    lazy = load_model(str(checkpoints["llama"]), lazy=True)
    loads = []
    real = lazy.rebuild
    lazy.rebuild = lambda: loads.append(1) or real()
    monkeypatch.setattr(LoadedModel, "copy", _no_copy)
    report = verify_graph(lazy, pair.streamed, [pair.adapter], shapes=[(2, 5), (1, 9)])
    assert report.passed, report.to_dict()
    assert report.checks["adapter_effect"]["passed"]
    assert len(loads) == 1


def _no_copy(self, **kw):
    raise AssertionError("a deep copy of the model was made")


def test_verify_with_several_adapters_uses_one_pytorch_model(sample_cache, tmp_path, monkeypatch):
    loaded = sample_cache("gpt2")
    adapters = [make_random_adapter(loaded, r=r, seed=s) for r, s in [(4, 1), (8, 2), (2, 3)]]
    path = export_branched(loaded, tmp_path / "bank.onnx", adapters=adapters, layout="bank").path
    monkeypatch.setattr(LoadedModel, "copy", _no_copy)
    entered = []
    real_enter = torch_runner.TorchRunner.__enter__

    def enter(self):
        runner = real_enter(self)
        weights = {p.data_ptr() for p in runner.model.module.parameters()}
        entered.append(weights == {p.data_ptr() for p in loaded.module.parameters()})
        return runner

    monkeypatch.setattr(torch_runner.TorchRunner, "__enter__", enter)
    report = verify_graph(loaded, path, adapters, shapes=[(4, 6)], oracle="lora-export")  # PEFT's side copies
    assert report.passed, report.to_dict()
    assert entered == [True]  # one PyTorch model, over the caller's own weight tensors
    assert not any(type(m).__name__ == "LoraLayer" for m in loaded.module.modules())  # caller's model untouched


def test_tied_lm_head_gets_its_own_merged_weight(checkpoints, sample_cache, tmp_path):
    loaded = sample_cache("gpt2")
    adapter = make_random_adapter(loaded, r=4, targets=["c_attn", "lm_head"], seed=7)
    result = export_merged(load_model(str(checkpoints["gpt2"]), lazy=True), adapter, tmp_path / "tied.onnx")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(result.path)).graph.initializer}
    wte = loaded.module.transformer.wte.weight.detach().numpy()
    np.testing.assert_array_equal(weights["transformer.wte.weight"], wte)
    assert not np.array_equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    report = verify_graph(loaded, result.path, [adapter], shapes=[(2, 9)])  # PyTorch: the LoRA branch unmerged
    assert report.passed and report.checks["adapter_effect"]["passed"], report.to_dict()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_streamed_export(checkpoints, sample_cache, tmp_path, dtype):
    """fp16: within fp16 tolerance of PEFT on ONNX Runtime; bf16 (no ONNX Runtime CPU kernels): the stored weights
    are the float32 merge rounded to bf16."""
    loaded = sample_cache("llama")
    pm = build_peft(loaded, seed=9, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    adapter = read_adapter(save_adapter(pm, tmp_path / "a"))
    lazy = load_model(str(checkpoints["llama"]), lazy=True)
    result = export_merged(lazy, adapter, tmp_path / f"{dtype}.onnx", dtype=dtype)
    graph = onnx.load(str(result.path))
    elem = onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.BFLOAT16
    assert graph.graph.output[0].type.tensor_type.elem_type == elem
    if dtype == "bf16":
        q = next(t for t in graph.graph.initializer if t.name == "model.layers.0.self_attn.q_proj.weight")
        w0 = loaded.module.model.layers[0].self_attn.q_proj.weight.detach().to(torch.bfloat16)
        want = adapter.modules["model.layers.0.self_attn.q_proj"].merged_with(w0)
        assert q.raw_data == want.view(torch.int16).numpy().tobytes()
        return
    with OrtRunner(result.path) as ort:
        for batch, seq, seed in [(2, 7, 0), (1, 12, 1)]:
            feeds = make_feeds(loaded, batch, seq, seed)
            got, ref = ort.infer(feeds)["logits"], peft_forward(pm, loaded, feeds)["logits"]
            np.testing.assert_allclose(got, ref, atol=3e-2, rtol=3e-2)


def test_bf16_with_verify_is_refused_before_any_work(tmp_path):
    result = run("merge-and-export", "sample:gpt2", "-o", tmp_path / "m.onnx", "--dtype", "bf16", ok=False)
    assert_one_line_error(result, r"bf16.*--no-verify")
    assert list(tmp_path.iterdir()) == []


def test_disk_space_refusal_before_any_work(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 1000, 1000))
    monkeypatch.setattr(trace_mod, "_export", lambda *a, **k: pytest.fail("traced before the disk check"))
    out = tmp_path / "sub" / "m.onnx"
    result = run("merge-and-export", "sample:gpt2", "-o", out, "--no-verify", ok=False)
    assert_one_line_error(result, r"not enough disk space for .*m\.onnx.*free")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(api.UserError, match="not enough disk space"):
        api.export_branched("sample:llama", tmp_path / "b.onnx", verify=False)
    assert list(tmp_path.iterdir()) == []

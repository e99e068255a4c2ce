"""Verify by layer: for a model that does not fit in memory, PyTorch runs module by module (weights read from
the checkpoint just in time, PEFT wrapping the skeleton as usual) and ONNX Runtime runs the graph in pieces.

The oracle is PEFT (its forward on the just-in-time model) and the whole-model verify: both must agree, a
wrong adapter must fail, and neither side may load the model or copy it. The memory bound is measured in
`test_scale.py` (kernel peak RSS of a 400 MB model).
"""

from __future__ import annotations

import pytest
import torch
from cli_helpers import assert_one_line_error, run
from conftest import make_random_adapter

from lora_export import api
from lora_export.errors import UserError
from lora_export.export.branched import export_branched
from lora_export.export.merged import export_merged
from lora_export.models.loading import LoadedModel, load_model
from lora_export.verify import by_layer, check
from lora_export.verify.check import verify_graph

ARCHS = ["gpt2", "llama", "bert"]


def _refuse_to_load():
    raise AssertionError("the model was loaded whole")


def _no_copy(self, **kw):
    raise AssertionError("a deep copy of the model was made")


@pytest.fixture
def tiny_pieces(monkeypatch):
    """64 KB pieces (the tiny samples' graphs cut into many), counting the piece sessions opened."""
    monkeypatch.setattr(by_layer, "SEGMENT_BYTES", 64 << 10)
    opened = []
    real = by_layer._piece_session
    monkeypatch.setattr(by_layer, "_piece_session", lambda g, p: opened.append(p["index"]) or real(g, p))
    return opened


@pytest.mark.parametrize("layout", ["merged", "bank"])
@pytest.mark.parametrize("arch", ARCHS)
def test_by_layer_verify_agrees_with_the_whole_model_verify(
    checkpoints, sample_cache, tmp_path, monkeypatch, tiny_pieces, arch, layout
):
    loaded = sample_cache(arch)
    adapters = [make_random_adapter(loaded, r=4, seed=3)]
    lazy = load_model(str(checkpoints[arch]), lazy=True)
    if layout == "merged":
        path = export_merged(lazy, adapters[0], tmp_path / "m.onnx").path
    else:
        adapters.append(make_random_adapter(loaded, r=2, seed=4))
        adapters[1].name = "other"
        path = export_branched(lazy, tmp_path / "b.onnx", adapters=adapters, layout="bank").path
    whole = verify_graph(lazy, path, adapters, shapes=[(2, 7)], by_layer=False)
    lazy.rebuild = _refuse_to_load  # by layer: never the whole model in memory, never a copy
    monkeypatch.setattr(LoadedModel, "copy", _no_copy)
    layered = verify_graph(lazy, path, adapters, shapes=[(2, 7)], by_layer=True)
    assert layered.passed, layered.to_dict()
    assert layered.checks["adapter_effect"]["passed"]
    assert "peft" in layered.reference  # PEFT's forward on the just-in-time model
    assert layered.method.startswith("by layer") and whole.method.startswith("whole")
    pieces = max(tiny_pieces) + 1
    assert pieces >= 4 and len(tiny_pieces) % pieces == 0  # every case ran every piece
    for a, b in zip(layered.summary().values(), whole.summary().values()):
        assert a["max_abs"] < 1e-5 and b["max_abs"] < 1e-5


def test_by_layer_verify_fails_a_graph_with_another_adapter(checkpoints, sample_cache, tmp_path, tiny_pieces):
    loaded = sample_cache("llama")
    exported, other = make_random_adapter(loaded, r=4, seed=3), make_random_adapter(loaded, r=4, seed=5)
    lazy = load_model(str(checkpoints["llama"]), lazy=True)
    path = export_merged(lazy, exported, tmp_path / "m.onnx").path
    report = verify_graph(lazy, path, [other], shapes=[(2, 7)], by_layer=True)
    assert not report.passed
    assert min(o["max_abs"] for o in report.summary().values()) > 1e-3


def test_jit_module_reads_each_weight_per_forward_and_holds_none_between(checkpoints, sample_cache):
    lazy = load_model(str(checkpoints["llama"]), lazy=True)
    module = by_layer.jit_module(lazy)
    ids = torch.randint(1, 1000, (2, 6))
    with torch.no_grad():
        got = module(input_ids=ids).logits
        want = sample_cache("llama").module(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    reads = module.weight_reads
    assert reads and set(reads.values()) == {1}  # one forward: each checkpoint tensor read once (tied: once each use)
    held = [owner for owner in module.modules() if hasattr(owner, by_layer.JIT_ATTR)]
    for owner in module.modules():  # between forwards every streamed parameter is its placeholder again
        for attr, (_, placeholder) in getattr(owner, by_layer.JIT_ATTR, {}).items():
            assert owner._parameters[attr] is placeholder
    assert held
    assert all(p.is_meta for p in lazy.module.parameters())  # the caller's skeleton is untouched


def test_auto_chooses_by_layer_when_the_weights_would_not_fit(checkpoints, sample_cache, tmp_path, monkeypatch):
    adapter = make_random_adapter(sample_cache("gpt2"), r=4, seed=3)
    lazy = load_model(str(checkpoints["gpt2"]), lazy=True)
    path = export_merged(lazy, adapter, tmp_path / "m.onnx").path
    assert verify_graph(lazy, path, [adapter], shapes=[(1, 5)]).method.startswith("whole")
    monkeypatch.setattr(check, "needs_by_layer", lambda weight_bytes: True)
    report = verify_graph(lazy, path, [adapter], shapes=[(1, 5)])
    assert report.passed and report.method.startswith("by layer")
    # a model already in memory is verified whole: there is no checkpoint to stream from
    assert verify_graph(sample_cache("gpt2"), path, [adapter], shapes=[(1, 5)]).method.startswith("whole")


def test_needs_by_layer_compares_the_weights_with_the_memory_available():
    gb = 1 << 30
    assert not by_layer.needs_by_layer(4 * gb, available=16 * gb)
    assert by_layer.needs_by_layer(32 * gb, available=24 * gb)  # an 8B model in float32 on a 24 GB machine
    assert 0 < by_layer.available_memory() < 1 << 50  # read from the OS (no psutil needed)


def test_by_layer_refusals_are_one_line(sample_cache, checkpoints, tmp_path):
    adapter = make_random_adapter(sample_cache("gpt2"), r=4, seed=3)
    path = export_merged(sample_cache("gpt2"), adapter, tmp_path / "m.onnx").path
    with pytest.raises(UserError, match="not a model directory with safetensors"):
        verify_graph(sample_cache("gpt2"), path, [adapter], by_layer=True)
    r = run("verify", "sample:gpt2", "--onnx", path, "--by-layer", ok=False)
    assert_one_line_error(r, "cannot verify by layer")


def test_cli_export_verifies_by_layer_and_says_so(checkpoints, sample_cache, tmp_path):
    adapter_dir = tmp_path / "adapter"
    api.make_adapter(str(checkpoints["gpt2"]), adapter_dir, r=4, seed=2)
    out = tmp_path / "m.onnx"
    r = run("merge-and-export", checkpoints["gpt2"], "--adapter", adapter_dir, "-o", out, "--by-layer")
    assert "ran: by layer" in r.output and "verified" in r.output

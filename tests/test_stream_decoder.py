"""Streamed decoder folders: `export-decoder` traces a weightless skeleton and writes each weight once, straight
from the checkpoint, and its generation check holds one copy of the weights at a time.

The oracle for the bytes is the in-memory decoder export the streamed one replaced (`legacy_decoder`: copy the
model, merge or wire the LoRA branch, trace the real weights, save); for tokens, the parity tests
(`test_decoder_parity.py`) compare every layout with PEFT's generate.
"""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import onnx
import pytest
import torch
from cli_helpers import assert_one_line_error, run
from conftest import make_random_adapter

from lora_export import api
from lora_export.adapters.inject import merge_adapter
from lora_export.adapters.layer import BranchFeed
from lora_export.artifacts import onnxio
from lora_export.artifacts.checkpoint import SafetensorsWeights
from lora_export.contract import BANK, MERGED
from lora_export.export import decoder as decoder_mod
from lora_export.export import stream
from lora_export.export import trace as trace_mod
from lora_export.export.branched import lora_wiring
from lora_export.export.kv_cache import probe
from lora_export.models.loading import LoadedModel, load_model
from lora_export.runtime import generator as gen_mod
from lora_export.verify import generation

TORCH_NOTES = "pkg.torch."  # metadata the torch exporter adds for debugging (FX node, ranges)


def legacy_decoder(loaded, adapters, layout, out):
    """The decoder export as it was before streaming: a deep copy with real weights, merged or wired, traced."""
    work = loaded.copy()
    extra, feed, wiring = [], None, None
    if layout == MERGED:
        merge_adapter(work.module, adapters[0])
    else:
        wiring = lora_wiring(loaded, adapters, None, layout, None, "fp32", decoder_mod.TRACE_BATCH)
        extra, feed = wiring.extra, BranchFeed(layout)
        wiring.attach(work.module, feed)
    view = decoder_mod.decoder_view(work, probe(loaded.module, loaded.source), torch.float32)
    model = trace_mod.trace(view, extra=extra, feed=feed, batch=decoder_mod.TRACE_BATCH, seq=decoder_mod.TRACE_SEQ)
    if wiring is not None:
        wiring.finish(work.module, model, prefix="model.")
    out.parent.mkdir(parents=True)
    trace_mod.save(model, out)
    return out


def _without_exporter_notes(path):
    model = onnx.load(str(path), load_external_data=False)
    for holder in [model, model.graph, *model.graph.node]:
        keep = [p for p in holder.metadata_props if not p.key.startswith(TORCH_NOTES)]
        del holder.metadata_props[:]
        holder.metadata_props.extend(keep)
    assert len(model.graph.initializer) > 10
    return model


def _refuse_to_load():
    raise AssertionError("the export loaded the model's weights")


def _no_copy(self, **kw):
    raise AssertionError("a deep copy of the model was made")


@pytest.mark.parametrize(("arch", "layout"), [("gpt2", MERGED), ("llama", MERGED), ("llama", BANK)])
def test_streamed_decoder_is_byte_identical_and_reads_each_tensor_once(
    checkpoints, sample_cache, tmp_path, monkeypatch, arch, layout
):
    loaded = sample_cache(arch)
    adapters = [make_random_adapter(loaded, r=4, seed=s) for s in ((5,) if layout == MERGED else (5, 6))]
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD", 1024)  # weights in `.data`, as for large models
    legacy = legacy_decoder(load_model(str(checkpoints[arch])), adapters, layout, tmp_path / "old" / "model.onnx")
    lazy = load_model(str(checkpoints[arch]), lazy=True)
    assert all(p.is_meta for p in lazy.module.parameters())
    lazy.rebuild = _refuse_to_load  # the export must never need the weights in memory
    monkeypatch.setattr(LoadedModel, "copy", _no_copy)
    sources, writes = [], []
    real_source = stream.weight_source
    monkeypatch.setattr(stream, "weight_source", lambda m: sources.append(real_source(m)) or sources[-1])
    result = decoder_mod.export_decoder(
        lazy, tmp_path / "new", adapters=adapters, layout=layout, on_write=lambda *a: writes.append(a)
    )
    assert (result.path / "model.onnx.data").read_bytes() == (legacy.parent / "model.onnx.data").read_bytes()
    # nodes, names, I/O and initializer entries identical; only the exporter's debug notes (FX node names such as
    # `clone_4` vs `clone`, symbol ranges) differ between a trace of real and of meta-device weights
    assert _without_exporter_notes(result.path / "model.onnx") == _without_exporter_notes(legacy)
    assert len(sources) == 1 and isinstance(sources[0], SafetensorsWeights)
    reads = sources[0].reads
    assert reads and max(reads.values()) == 1  # each checkpoint tensor read once
    assert writes and writes[-1][0] == writes[-1][1] > 0  # progress reaches the total bytes
    if layout == BANK:
        assert sorted(result.adapters) == sorted(a.name for a in adapters)


def test_export_decoder_loads_the_model_once_and_never_copies_it(checkpoints, sample_cache, tmp_path, monkeypatch):
    """The API loads a checkpoint lazily, streams the export, then runs our side and closes the session
    before the PyTorch model is loaded (once) for the generation check."""
    adapter = make_random_adapter(sample_cache("llama"), r=4, seed=8)
    loads, events = [], []
    real_load = load_model

    def lazy_load(spec, lazy=False):
        loaded = real_load(spec, lazy=lazy)
        assert lazy, "export-decoder loaded the model eagerly"
        rebuild = loaded.rebuild
        loaded.rebuild = lambda: loads.append(1) or events.append("torch") or rebuild()
        return loaded

    monkeypatch.setattr(api, "load_model", lazy_load)
    monkeypatch.setattr(LoadedModel, "copy", _no_copy)
    real_exit = gen_mod.Generator.__exit__
    closed = lambda s, *e: events.append("session closed") or real_exit(s, *e)  # noqa: E731
    monkeypatch.setattr(gen_mod.Generator, "__exit__", closed)
    outcome = api.export_decoder(str(checkpoints["llama"]), tmp_path / "f", adapters=[adapter], layout=MERGED)
    assert outcome.report.passed, outcome.report.to_dict()
    assert all(c.effect is not None and c.effect > 1e-3 for c in outcome.report.cases)  # the adapter is in there
    assert loads == [1]
    assert events == ["session closed", "torch"]  # one copy of the weights in memory at a time


def test_generation_reference_shares_the_callers_weights(sample_cache):
    loaded = sample_cache("gpt2")
    ref = generation.Reference(loaded)
    ours = {p.data_ptr() for p in ref.model.parameters()}
    assert ours == {p.data_ptr() for p in loaded.module.parameters()}
    ref.use(make_random_adapter(loaded, r=4, seed=1))
    assert not any(type(m).__name__ == "LoraLayer" for m in loaded.module.modules())  # caller's model untouched


def test_lazy_load_reads_generation_config_as_from_pretrained(checkpoints, tmp_path):
    """eos / pad / sampling defaults of generation_config.json reach a streamed decoder folder's genai_config."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["llama"], ckpt)
    gen = (
        json.loads((ckpt / "generation_config.json").read_text()) if (ckpt / "generation_config.json").exists() else {}
    )
    gen.update(eos_token_id=[5, 7], pad_token_id=3, temperature=0.6, top_p=0.9, do_sample=True)
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    eager, lazy = load_model(str(ckpt)), load_model(str(ckpt), lazy=True)
    assert lazy.module.generation_config.to_dict() == eager.module.generation_config.to_dict()
    folder = decoder_mod.export_decoder(lazy, tmp_path / "f").path
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["eos_token_id"] in ([5, 7], 5)
    assert config["model"]["pad_token_id"] == 3
    assert config["search"]["temperature"] == 0.6 and config["search"]["top_p"] == 0.9


def test_fp16_streamed_decoder_matches_peft_within_fp16_tolerance(checkpoints, sample_cache, tmp_path):
    """A half-precision folder streamed from the checkpoint: the merge is computed in float32 and stored as fp16
    (half the bytes); its logits stay within fp16 tolerance of the float32 PyTorch reference."""
    adapter = make_random_adapter(sample_cache("llama"), r=4, seed=12)
    lazy = load_model(str(checkpoints["llama"]), lazy=True)
    lazy.rebuild = _refuse_to_load
    folder = decoder_mod.export_decoder(lazy, tmp_path / "f16", adapters=[adapter], dtype="fp16").path
    graph = onnx.load(str(folder / "model.onnx"))
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {t.data_type for t in graph.graph.initializer if len(t.dims) == 2} == {onnx.TensorProto.FLOAT16}
    report = generation.verify_generation(load_model(str(checkpoints["llama"])), folder, [adapter], new_tokens=4)
    for case in report.cases:
        assert case.max_logits_err < 5e-2, case
        assert case.effect is not None and case.effect > 10 * case.max_logits_err  # the merged adapter is there


@pytest.mark.parametrize("layout", [MERGED, BANK])
def test_decoder_disk_space_refusal_before_any_work(tmp_path, monkeypatch, layout):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 1000, 1000))
    monkeypatch.setattr(trace_mod, "_export", lambda *a, **k: pytest.fail("traced before the disk check"))
    result = run("export-decoder", "sample:llama", "-o", tmp_path / "f", "--layout", layout, "--no-verify", ok=False)
    assert_one_line_error(result, r"not enough disk space for .*model\.onnx.*free")
    assert list(tmp_path.iterdir()) == []

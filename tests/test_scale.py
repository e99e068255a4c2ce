"""Exports from a sharded safetensors directory, with PEFT as the oracle, bounded memory and clean refusals.

The models are saved with `save_pretrained(max_shard_size=...)` small enough that every checkpoint has
several shards, then exported lazily (a weightless skeleton is traced and the weights are read from the
shards once each). PEFT models with non-zero `lora_B` over the same weights give the expected outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import assert_one_line_error, run
from peft_oracle import build_peft, peft_forward, save_adapter

from lora_export import api
from lora_export.artifacts import onnxio
from lora_export.artifacts.checkpoint import SafetensorsWeights
from lora_export.backends.onnxrt import OrtRunner
from lora_export.errors import AdapterError
from lora_export.export import merged, stream
from lora_export.export import trace as trace_mod
from lora_export.runtime import LoraSession
from lora_export.verify.check import make_feeds

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}
CASES = [(2, 7, 0), (1, 12, 1)]  # (batch, seq, seed)
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def setups(sample_cache, tmp_path_factory):
    """Per arch: the sample saved as a sharded checkpoint, a PEFT model (non-zero B) and its adapter directory."""
    root = tmp_path_factory.mktemp("scale")
    out = {}
    for i, arch in enumerate(TARGETS):
        loaded = sample_cache(arch)
        ckpt = root / f"{arch}_ckpt"
        loaded.module.save_pretrained(ckpt, max_shard_size="200KB")
        pm = build_peft(
            loaded, seed=40 + i, r=4, lora_alpha=8, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2"
        )
        out[arch] = dict(loaded=loaded, ckpt=ckpt, pm=pm, adapter=save_adapter(pm, root / f"{arch}_adapter"))
    return out


@pytest.fixture(scope="module")
def exports(setups, tmp_path_factory):
    """(arch, kind) -> (graph path, the checkpoint source that streamed its weights), exported on first use."""
    root = tmp_path_factory.mktemp("scale_graphs")
    cache = {}

    def get(arch, kind):
        if (arch, kind) not in cache:
            s = setups[arch]
            sources = []
            real = stream.weight_source
            out = root / f"{arch}_{kind}.onnx"
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(stream, "weight_source", lambda m: sources.append(real(m)) or sources[-1])
                if kind == "merged":
                    api.merge_and_export(str(s["ckpt"]), s["adapter"], out, verify=False)
                else:
                    api.export_branched(str(s["ckpt"]), out, adapters=[s["adapter"]], verify=False)
            assert len(sources) == 1 and isinstance(sources[0], SafetensorsWeights)
            cache[arch, kind] = out, sources[0]
        return cache[arch, kind]

    return get


def _peft(s, feeds, with_adapter=True):
    if with_adapter:
        return peft_forward(s["pm"], s["loaded"], feeds)
    with s["pm"].disable_adapter():
        return peft_forward(s["pm"], s["loaded"], feeds)


def _close(got, ref):
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=ATOL, rtol=RTOL, err_msg=k)


def _assert_effect(s, feeds):
    """The adapter changes the outputs far beyond the tolerance (a zero or dropped adapter cannot pass)."""
    effect = max(float(np.abs(a - b).max()) for a, b in zip(_peft(s, feeds).values(), _peft(s, feeds, False).values()))
    assert effect > 100 * ATOL, effect


@pytest.mark.parametrize("arch", list(TARGETS))
def test_sharded_checkpoint_is_read_once_from_every_shard(setups, exports, arch):
    graph, source = exports(arch, "merged")
    shards = {p.name for p in setups[arch]["ckpt"].glob("*.safetensors")}
    assert len(shards) >= 3, shards  # the fixture really made a sharded checkpoint
    assert {source._file_of[name].name for name in source.reads} == shards
    assert max(source.reads.values()) == 1
    stored = {t.name for t in onnx.load(str(graph), load_external_data=False).graph.initializer}
    assert {n for n in source.keys() if n in stored} <= set(source.reads)


@pytest.mark.parametrize("arch", list(TARGETS))
def test_merged_from_shards_matches_peft(setups, exports, arch):
    s = setups[arch]
    graph, _ = exports(arch, "merged")
    with OrtRunner(graph) as ort:
        for batch, seq, seed in CASES:
            feeds = make_feeds(s["loaded"], batch, seq, seed)
            _assert_effect(s, feeds)
            _close(ort.infer(feeds), _peft(s, feeds))


@pytest.mark.parametrize("arch", list(TARGETS))
def test_branched_from_shards_matches_peft_with_and_without_the_adapter(setups, exports, arch):
    s = setups[arch]
    graph, _ = exports(arch, "branched")
    with LoraSession(graph) as sess:
        sess.load_adapter("a", s["adapter"])
        for batch, seq, seed in CASES:
            feeds = make_feeds(s["loaded"], batch, seq, seed)
            _close(sess.run(feeds, adapter="a"), _peft(s, feeds))
            _close(sess.run(feeds), _peft(s, feeds, with_adapter=False))


# -- bad checkpoints: one line, before any output ------------------------------------------------------------


@pytest.fixture
def broken(setups, tmp_path):
    """A private copy of the gpt2 sharded checkpoint to damage."""
    src = setups["gpt2"]["ckpt"]
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _index(ckpt: Path) -> dict:
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


def _refused(ckpt: Path, out_dir: Path, pattern: str) -> None:
    out_dir.mkdir()
    result = run("merge-and-export", ckpt, "-o", out_dir / "m.onnx", "--no-verify", ok=False)
    assert_one_line_error(result, pattern)
    assert list(out_dir.iterdir()) == []  # no graph, no data file, no temp dir


def test_truncated_shard_is_refused_before_any_work(broken, tmp_path, monkeypatch):
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    monkeypatch.setattr(merged, "export_skeleton", lambda *a, **k: pytest.fail("work started"))
    _refused(broken, tmp_path / "out", rf"cannot read .*{shard.name}.*damaged")


def test_missing_shard_is_refused(broken, tmp_path):
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.unlink()
    _refused(broken, tmp_path / "out", rf"cannot read .*{shard.name}")


def test_index_naming_a_tensor_its_shard_lacks_is_refused(broken, tmp_path):
    index = _index(broken)
    first = sorted(index["weight_map"])[0]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][first])
    index["weight_map"][first] = other
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(broken, tmp_path / "out", rf"{other} lacks {first}.*incomplete")


def test_checkpoint_without_a_weight_is_refused(broken, tmp_path):
    index = _index(broken)
    name = next(n for n in index["weight_map"] if n.endswith("mlp.c_fc.weight"))
    del index["weight_map"][name]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(broken, tmp_path / "out", rf"has no tensor {name}")


def test_weights_of_another_shape_are_refused_and_nothing_is_left(broken, tmp_path):
    """A config that does not match its weights is found when the tensor is read: the half-written graph goes."""
    config = json.loads((broken / "config.json").read_text())
    config["n_positions"] = config["n_positions"] * 2  # wpe no longer matches
    (broken / "config.json").write_text(json.dumps(config))
    _refused(broken, tmp_path / "out", r"transformer\.wpe\.weight has shape .* expects")


@pytest.mark.parametrize("external", [True, False])
def test_a_weight_refused_while_the_graph_is_written_is_one_error_and_no_file(tmp_path, monkeypatch, external):
    """Weights are read and merged while the graph is written (a merge past the export dtype's range, a
    tensor changed since its header was read): the refusal reaches the user as itself, not wrapped by the
    serializer, and the half-written files are removed."""
    import onnx_ir as ir

    def refuse():
        raise AdapterError("h.0.attn.c_attn: merging gives NaN/Inf in torch.float16 (values too large)")

    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD", 0 if external else 1 << 30)
    shape = ir.Shape([4, 4])
    weight = ir.Value(name="w", shape=shape, type=ir.TensorType(ir.DataType.FLOAT))
    weight.const_value = ir.LazyTensor(refuse, dtype=ir.DataType.FLOAT, shape=shape, name="w")
    x = ir.Value(name="x", shape=shape, type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Add", [x, weight], num_outputs=1)
    node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type = "y", shape, x.type
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 18})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(AdapterError, match="merging gives NaN/Inf"):
        trace_mod.save(ir.Model(graph, ir_version=10), out / "m.onnx")
    assert list(out.iterdir()) == []


# -- peak memory, measured by the kernel in a fresh process --------------------------------------------------

MEASURE = """
import json, sys
from lora_export import api
from lora_export.adapters import read_adapter
from lora_export.models.loading import load_model
from lora_export.verify import by_layer
from lora_export.verify.check import verify_graph

def peak():  # this process's own high-water mark: ru_maxrss would start from the parent's (pytest's) RSS
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

ckpt, adapter, out = sys.argv[1:4]
api.make_adapter(ckpt, adapter, r=8, seed=1)  # reads shapes only
loaded, ad = load_model(ckpt, lazy=True), read_adapter(adapter)
start = peak()
api.merge_and_export(loaded, ad, out, verify=False)
exported = peak()
by_layer.SEGMENT_BYTES = 64 << 20
layered = verify_graph(loaded, out, [ad], shapes=[(1, 8)], by_layer=True)  # first: the peak is a high-water mark
by_layer_peak = peak()
report = verify_graph(loaded, out, [ad], shapes=[(1, 8)], by_layer=False)
print(json.dumps({"start": start, "exported": exported, "by_layer": by_layer_peak, "verified": peak(),
                  "passed": report.passed, "by_layer_passed": layered.passed, "method": layered.method}))
"""


def _write_checkpoint(out: Path, config) -> int:
    """A random-weight checkpoint written one tensor at a time, a few shards; returns its weight bytes."""
    import transformers
    from safetensors.torch import save_file

    from lora_export.models.skeleton import params_on_meta

    with params_on_meta():
        model = transformers.GPT2LMHeadModel(config)
    out.mkdir()
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    params = list(model.named_parameters())
    for i in range(0, len(params), 6):
        shard = {n: torch.randn(p.shape, generator=g) * 0.02 for n, p in params[i : i + 6]}
        name = f"model-{i // 6:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * 4 for t in shard.values())
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _measure(tmp_path: Path, n_layer: int) -> tuple[int, dict]:
    """Export, verify by layer, verify whole: a fresh process's own peak RSS after each, for a GPT-2 of
    `n_layer` blocks 1024 wide (50 MB of weights a block, the largest tensor 17 MB)."""
    import transformers

    config = transformers.GPT2Config(n_layer=n_layer, n_embd=1024, n_head=16, vocab_size=1000, n_positions=128)
    config.architectures = ["GPT2LMHeadModel"]
    root = tmp_path / f"l{n_layer}"
    root.mkdir()
    weights = _write_checkpoint(root / "ckpt", config)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    args = [str(root / "ckpt"), str(root / "adapter"), str(root / "m.onnx")]
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], env=env, capture_output=True, text=True, timeout=300, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rss["passed"] and rss["by_layer_passed"] and rss["method"].startswith("by layer")
    assert (root / "m.onnx.data").stat().st_size >= weights
    return weights, rss


def test_peak_memory_is_set_by_the_largest_layer_not_the_model(tmp_path):
    """The same blocks, 2 and 6 of them (105 vs 307 MB of weights): what each step adds to the peak resident
    set per extra byte of weights. The streamed export and a by-layer verify (64 MB pieces) hold one tensor,
    module or piece at a time, so a deeper model costs them (almost) nothing more; a whole-model verify holds
    one copy of the weights at a time (PyTorch, then ONNX Runtime): about 1x, which shows the measure sees a
    copy when there is one. Peak RSS is the kernel's high-water mark of the child's own memory (`VmHWM`;
    `ru_maxrss` would start from pytest's), not a timing."""
    (w2, small), (w6, large) = _measure(tmp_path, 2), _measure(tmp_path, 6)
    assert w6 > 2.5 * w2

    def slope(step: str) -> float:
        return ((large[step] - large["start"]) - (small[step] - small["start"])) / (w6 - w2)

    export, layered, whole = slope("exported"), slope("by_layer"), slope("verified")
    print(f"peak RSS per extra weight byte: export {export:.2f}, by-layer verify {layered:.2f}, whole {whole:.2f}")
    assert export < 0.25, f"the export's peak grows {export:.2f}x the weights: a copy of the model somewhere?"
    assert layered < 0.35, f"a by-layer verify's peak grows {layered:.2f}x the weights"
    assert 0.6 < whole < 1.6, f"a whole-model verify's peak grows {whole:.2f}x the weights (one copy expected)"

"""Branched export and the adapter runtime, with PEFT as the oracle."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
import torch
from peft_oracle import add_peft_adapter, build_peft, peft_forward, peft_with, save_adapter

from lora_export.adapters import read_adapter
from lora_export.adapters.adapter import Adapter, ModuleLora
from lora_export.adapters.pack import pack_adapter
from lora_export.artifacts.onnxio import read_manifest
from lora_export.errors import AdapterError, UserError
from lora_export.export.branched import export_branched
from lora_export.runtime import LoraSession
from lora_export.verify.check import make_feeds

TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
RANKS = {"x": 8, "y": 4, "z": 16}


def _cfg(arch, r, **kw):
    return dict(r=r, lora_alpha=2 * r, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2", **kw)


@pytest.fixture(scope="module")
def setups(sample_cache, tmp_path_factory):
    """Per arch: one PEFT model holding adapters x, y, z (ranks 8, 4, 16), their dirs, one branched graph."""
    root = tmp_path_factory.mktemp("branched")
    out = {}
    for i, arch in enumerate(["gpt2", "llama", "bert"]):
        loaded = sample_cache(arch)
        pm = build_peft(loaded, seed=10 * i, adapter_name="x", **_cfg(arch, RANKS["x"], use_rslora=arch == "bert"))
        add_peft_adapter(pm, "y", 10 * i + 1, **_cfg(arch, RANKS["y"]))
        add_peft_adapter(pm, "z", 10 * i + 2, **_cfg(arch, RANKS["z"]))
        dirs = {n: save_adapter(pm, root / arch, n) for n in ("x", "y", "z")}
        graph = export_branched(loaded, root / f"{arch}.onnx", adapters=[read_adapter(dirs["x"])]).path
        out[arch] = dict(loaded=loaded, pm=pm, dirs=dirs, graph=graph)
    return out


def _peft(s, feeds, adapter):
    return peft_with(s["pm"], s["loaded"], feeds, adapter)


def _close(got, ref, atol=1e-4):
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=atol, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_branched_with_each_adapter_matches_peft_and_none_is_base(setups, arch):
    s = setups[arch]
    feeds = make_feeds(s["loaded"], 3, 11, 7)
    with LoraSession(s["graph"]) as sess:
        for name, d in s["dirs"].items():
            sess.load_adapter(name, d)
        for name in ("x", "y", "z"):  # ranks 8, 4 and 16 through one graph
            _close(sess.run(feeds, adapter=name), _peft(s, feeds, name))
        base = sess.run(feeds)
        _close(base, _peft(s, feeds, None))
        assert max(float(np.abs(base[k] - _peft(s, feeds, "x")[k]).max()) for k in base) > 1e-2


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_switching_x_y_x_is_bit_identical(setups, arch):
    s = setups[arch]
    feeds = make_feeds(s["loaded"], 2, 9, 3)
    with LoraSession(s["graph"]) as sess:
        sess.load_adapter("x", s["dirs"]["x"])
        sess.load_adapter("y", s["dirs"]["y"])
        first = sess.run(feeds, adapter="x")
        middle = sess.run(feeds, adapter="y")
        again = sess.run(feeds, adapter="x")
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert all(not np.array_equal(first[k], middle[k]) for k in first)


def test_graph_follows_the_name_contract(setups):
    s = setups["llama"]
    model = onnx.load(str(s["graph"]))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    slots = [n[: -len(".lora_A.weight")] for n in inputs if n.endswith(".lora_A.weight")]
    assert len(slots) == 4 and "model.layers.0.self_attn.q_proj" in slots
    for path in sorted(slots):
        a, b = inputs[f"{path}.lora_A.weight"], inputs[f"{path}.lora_B.weight"]
        out_dim, in_dim = inits[f"{path}.weight"]  # base weights keep their names (nn.Linear: [out, in])
        assert a[0] == in_dim and isinstance(a[1], str) and b == [a[1], out_dim]  # [in, r], [r, out], r symbolic
        assert inits[f"{path}.lora_A.weight"] == [in_dim, 0] and inits[f"{path}.lora_B.weight"] == [0, out_dim]
    assert len({inputs[f"{p}.lora_A.weight"][1] for p in slots}) == len(slots)  # one rank dim per module


def test_adapter_targeting_some_modules(setups, tmp_path):
    s = setups["llama"]
    loaded = s["loaded"]
    pm = build_peft(loaded, seed=77, **_cfg("llama", 6, layers_to_transform=[1]))
    d = save_adapter(pm, tmp_path / "partial")
    assert len(read_adapter(d).modules) == 2  # of the graph's 4 slots
    feeds = make_feeds(loaded, 2, 8, 1)
    with LoraSession(s["graph"]) as sess:
        sess.load_adapter("x", s["dirs"]["x"])
        sess.load_adapter("partial", d)
        sess.run(feeds, adapter="x")  # a full adapter before must not leak into the partial one
        _close(sess.run(feeds, adapter="partial"), peft_forward(pm, loaded, feeds))


@pytest.mark.parametrize("formulation", ["dense", "gather"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_bank_mixed_batch_matches_peft_row_by_row(setups, arch, formulation, tmp_path):
    s = setups[arch]
    adapters = [read_adapter(s["dirs"][n], name=n) for n in ("x", "y", "z")]
    graph = export_branched(
        s["loaded"], tmp_path / "bank.onnx", adapters=adapters, layout="bank", max_rank=16, bank_formulation=formulation
    ).path
    assert read_manifest(graph).extra["bank_formulation"] == formulation
    gathers = sum(n.op_type == "Gather" for n in onnx.load(str(graph), load_external_data=False).graph.node)
    assert gathers >= (2 * len(TARGETS[arch]) * 2 if formulation == "gather" else 0)  # each row's A and B per slot
    rows = ["x", None, "z", "y", "x", None]
    feeds = make_feeds(s["loaded"], len(rows), 10, 5)
    with LoraSession(graph) as sess:
        for a in adapters:
            sess.load_adapter(a.name, a)
        got = sess.run(feeds, adapters=rows)
        assert sess.store._tmp is None  # a bank packs nothing: no temp dir to leave behind if the process is killed
        with pytest.raises(AdapterError, match="out of range"):
            sess.run({**feeds, "adapter_index": np.array([0, 1, 7, -1, 0, 0])})
        too_big = read_adapter(save_adapter(build_peft(s["loaded"], seed=1, **_cfg(arch, 32)), tmp_path / "r32"))
        with pytest.raises(AdapterError, match="max rank 16"):
            sess.load_adapter("r32", too_big)
    ref = peft_forward(s["pm"], s["loaded"], feeds, adapter_names=[r or "__base__" for r in rows])
    _close(got, ref)
    for i, r in enumerate(rows):  # and each row equals that adapter applied alone
        alone = _peft(s, feeds, r)
        for k in got:
            np.testing.assert_allclose(got[k][i], alone[k][i], atol=1e-4, rtol=1e-4)


def test_packed_adapter_runs_in_plain_onnxruntime(setups, tmp_path):
    import onnxruntime as ort

    s = setups["gpt2"]
    packed = pack_adapter(read_adapter(s["dirs"]["y"]), tmp_path / "y.onnx_adapter", graph=s["graph"])
    feeds = make_feeds(s["loaded"], 2, 12, 9)
    # no code of ours at run time: ORT's own multi-LoRA API
    session = ort.InferenceSession(str(s["graph"]), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(packed))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    (logits,) = session.run(["logits"], feeds, options)
    np.testing.assert_allclose(logits, _peft(s, feeds, "y")["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".onnx_adapter"])
def test_contract_files_load_with_or_without_peft_prefix(setups, tmp_path, suffix):
    from lora_export.adapters.pack import packed_tensors, write_packed

    s = setups["gpt2"]
    tensors = packed_tensors(read_adapter(s["dirs"]["z"]))
    prefixed = {f"base_model.model.{k}": v for k, v in tensors.items()}  # as other tools name them
    path = write_packed(prefixed, tmp_path / f"z{suffix}")
    feeds = make_feeds(s["loaded"], 2, 6, 2)
    with LoraSession(s["graph"]) as sess:
        sess.load_adapter("z", path)
        _close(sess.run(feeds, adapter="z"), _peft(s, feeds, "z"))


def test_fp16_pack_is_half_precision(setups, tmp_path):
    import onnxruntime as ort

    s = setups["gpt2"]
    packed = pack_adapter(read_adapter(s["dirs"]["x"]), tmp_path / "x16.onnx_adapter", dtype="fp16")
    params = ort.AdapterFormat.read_adapter(str(packed)).get_parameters()
    assert {v.numpy().dtype for v in params.values()} == {np.dtype(np.float16)}


def test_concurrent_calls_with_different_adapters_do_not_cross_talk(setups):
    s = setups["gpt2"]
    feeds = make_feeds(s["loaded"], 1, 8, 4)
    with LoraSession(s["graph"]) as sess:
        for n, d in s["dirs"].items():
            sess.load_adapter(n, d)
        reference = {n: sess.run(feeds, adapter=n)["logits"] for n in ("x", "y", "z")}
        errors: list[str] = []

        def worker(t: int) -> None:
            for i in range(50):
                name = ("x", "y", "z")[(t + i) % 3]
                got = sess.run(feeds, adapter=name)["logits"]
                if not np.allclose(got, reference[name], atol=1e-6, rtol=0):
                    errors.append(f"thread {t} call {i} adapter {name}")

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert not np.allclose(reference["x"], reference["y"], atol=1e-3)  # the check can tell adapters apart


# -- bad inputs: one clear error, never a crash inside ONNX Runtime ------------------------------------------------
def test_adapter_for_another_model_is_refused_with_the_module_name(setups):
    with LoraSession(setups["gpt2"]["graph"]) as sess:
        with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj.*no LoRA slot"):
            sess.load_adapter("llama", setups["llama"]["dirs"]["x"])


def test_adapter_with_wrong_dims_is_refused_with_both_shapes(setups):
    path = "transformer.h.0.attn.c_attn"
    bad = Adapter(
        spec=None, modules={path: ModuleLora(A=torch.ones(4, 32), B=torch.ones(192, 4), scaling=1.0)}, name="bad"
    )
    with LoraSession(setups["gpt2"]["graph"]) as sess:
        with pytest.raises(AdapterError, match=rf"{path}.*in=32.*graph slot is in=64, out=192"):
            sess.load_adapter("bad", bad)


def test_unknown_adapter_name(setups):
    feeds = make_feeds(setups["gpt2"]["loaded"], 1, 4, 0)
    with LoraSession(setups["gpt2"]["graph"]) as sess:
        sess.load_adapter("x", setups["gpt2"]["dirs"]["x"])
        with pytest.raises(UserError, match="no adapter named 'nope' is loaded \\(loaded: x\\)"):
            sess.run(feeds, adapter="nope")
        sess.unload("x")
        assert sess.adapters() == []


def test_merged_graph_is_not_a_lora_session(sample_cache, tmp_path):
    from lora_export.export.merged import export_merged

    path = export_merged(sample_cache("gpt2"), None, tmp_path / "m.onnx").path
    with pytest.raises(UserError, match="no LoRA inputs"):
        LoraSession(path)


def test_export_with_targets_and_no_adapter(sample_cache, tmp_path):
    result = export_branched(sample_cache("gpt2"), tmp_path / "t.onnx", targets=["c_attn", "c_fc"])
    assert [m["path"] for m in result.manifest["lora_modules"]] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.mlp.c_fc",
    ]
    with pytest.raises(AdapterError, match="match no Linear"):
        export_branched(sample_cache("gpt2"), tmp_path / "u.onnx", targets=["nonexistent"])
    assert not (tmp_path / "u.onnx").exists()

"""DoRA and embedding LoRA against PEFT, merged and branched, and the one-line refusals of adapter features.

One tiny Llama (1 layer) holds three PEFT adapters: `d` (DoRA on q/v/down), `e` (LoRA on `embed_tokens` and q,
saved by PEFT with the embedding's base weights, `save_embedding_layers`) and `p` (plain LoRA on q/v). A tiny
GPT-2 (Conv1D weights stored `[in, out]`, `wte` tied to `lm_head`) holds `g`, DoRA on `c_attn` and `wte`.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from arch_zoo import build
from peft_oracle import add_peft_adapter, build_peft, move_dora_magnitudes, peft_forward, save_adapter

from lora_export.adapters import read_adapter
from lora_export.adapters.pack import pack_adapter
from lora_export.backends.onnxrt import OrtRunner
from lora_export.contract import INPUTS, Slot, SlotTable
from lora_export.errors import AdapterError
from lora_export.export.branched import export_branched
from lora_export.export.merged import export_merged
from lora_export.runtime import LoraSession
from lora_export.verify.check import make_feeds


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    loaded = build("llama", num_hidden_layers=1)
    pm = build_peft(
        loaded, seed=1, adapter_name="d", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        use_dora=True,
    )  # fmt: skip
    move_dora_magnitudes(pm, "d", 2)
    add_peft_adapter(pm, "e", 3, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    add_peft_adapter(pm, "p", 4, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    dirs = {n: save_adapter(pm, root / "adapters", n) for n in ("d", "e", "p")}
    adapters = {n: read_adapter(d, name=n) for n, d in dirs.items()}
    graphs = {
        "inputs": export_branched(loaded, root / "inputs.onnx", adapters=[adapters["d"], adapters["e"]]).path,
        "bank": export_branched(loaded, root / "bank.onnx", adapters=list(adapters.values()), layout="bank").path,
    }
    return dict(loaded=loaded, pm=pm, dirs=dirs, adapters=adapters, graphs=graphs, root=root)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds_gpt2")
    loaded = build("gpt2", n_layer=1)
    pm = build_peft(
        loaded, seed=5, adapter_name="g", r=4, lora_alpha=8, target_modules=["c_attn", "wte"], use_dora=True,
        fan_in_fan_out=True,
    )  # fmt: skip
    move_dora_magnitudes(pm, "g", 6)
    d = save_adapter(pm, root / "g", "g")
    adapter = read_adapter(d, name="g")
    return dict(loaded=loaded, pm=pm, dir=d, adapter=adapter, root=root)


def _peft(s, feeds, name):
    pm = s["pm"]
    if name is None:
        with pm.disable_adapter():
            return peft_forward(pm, s["loaded"], feeds)
    pm.set_adapter(name)
    return peft_forward(pm, s["loaded"], feeds)


def _close(got, ref, atol=1e-4):
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=atol, rtol=1e-4, err_msg=k)


def _effect(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _merge_and_unload(s, name, feeds):
    pm = copy.deepcopy(s["pm"])
    pm.set_adapter(name)
    merged = pm.merge_and_unload()
    with torch.no_grad():
        out = merged(**{k: torch.from_numpy(v) for k, v in feeds.items()}, use_cache=False)
    return {"logits": out.logits.numpy()}


def test_peft_files_read_as_dora_and_embedding_modules(llama):
    d, e = llama["adapters"]["d"], llama["adapters"]["e"]
    assert d.is_dora and all(m.magnitude is not None for m in d.modules.values())
    assert e.modules["model.embed_tokens"].embedding and not e.is_dora
    assert sorted(e.base_layers) == ["model.embed_tokens"]  # PEFT saved the embedding's base weights too


def test_dora_merged_equals_merge_and_unload(llama, tmp_path):
    path = export_merged(llama["loaded"], llama["adapters"]["d"], tmp_path / "d.onnx").path
    feeds = make_feeds(llama["loaded"], 2, 12, 0)
    with OrtRunner(path) as runner:
        got = runner.infer(feeds)
    _close(got, _merge_and_unload(llama, "d", feeds))
    _close(got, _peft(llama, feeds, "d"))
    assert _effect(got, _peft(llama, feeds, None)) > 1e-2


def test_embedding_lora_merged_folds_into_the_table(llama, tmp_path):
    path = export_merged(llama["loaded"], llama["adapters"]["e"], tmp_path / "e.onnx").path
    feeds = make_feeds(llama["loaded"], 3, 9, 1)
    with OrtRunner(path) as runner:
        got = runner.infer(feeds)
    _close(got, _peft(llama, feeds, "e"))
    assert _effect(got, _peft(llama, feeds, None)) > 1e-2


def test_dora_and_embedding_adapters_swap_on_one_branched_graph(llama):
    feeds = make_feeds(llama["loaded"], 2, 16, 2)
    with LoraSession(llama["graphs"]["inputs"]) as sess:
        for name, d in llama["dirs"].items():
            sess.load_adapter(name, d)
        for name in ("d", "e", "p", "d"):  # DoRA, embedding LoRA, plain LoRA (default DoRA scale = ones)
            ref = _peft(llama, feeds, name)
            _close(sess.run(feeds, adapter=name), ref)
            assert _effect(ref, _peft(llama, feeds, None)) > 1e-2
        _close(sess.run(feeds), _peft(llama, feeds, None))


def test_dora_plain_and_embedding_adapters_mix_per_row_on_a_bank(llama):
    rows = ["d", "p", None, "e", "d", "p", "e"]
    feeds = make_feeds(llama["loaded"], len(rows), 10, 3)
    with LoraSession(llama["graphs"]["bank"]) as sess:
        for name, d in llama["dirs"].items():
            sess.load_adapter(name, d)
        got = sess.run(feeds, adapters=rows)
    for i, name in enumerate(rows):
        np.testing.assert_allclose(got["logits"][i], _peft(llama, feeds, name)["logits"][i], atol=1e-4, rtol=1e-4)


def test_dora_adapter_packs_against_the_graph_and_runs_in_plain_onnxruntime(llama, tmp_path):
    import onnxruntime as ort

    with pytest.raises(AdapterError, match=r"DoRA module \(use_dora\).*--graph") as e:
        pack_adapter(llama["adapters"]["d"], tmp_path / "nograph.onnx_adapter")
    assert "\n" not in str(e.value) and not (tmp_path / "nograph.onnx_adapter").exists()
    graph = llama["graphs"]["inputs"]
    packed = pack_adapter(llama["adapters"]["d"], tmp_path / "d.onnx_adapter", graph=graph)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(packed))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    feeds = make_feeds(llama["loaded"], 2, 7, 4)
    (logits,) = session.run(["logits"], feeds, options)
    np.testing.assert_allclose(logits, _peft(llama, feeds, "d")["logits"], atol=1e-4, rtol=1e-4)
    with LoraSession(graph) as sess:  # the packed file (holding g, not m) loads back too
        sess.load_adapter("packed", packed)
        _close(sess.run(feeds, adapter="packed"), _peft(llama, feeds, "d"))


def test_dora_on_conv1d_and_a_tied_embedding_merged_and_branched(gpt2, tmp_path):
    loaded, adapter = gpt2["loaded"], gpt2["adapter"]
    feeds = make_feeds(loaded, 2, 11, 5)
    ref = _peft(gpt2, feeds, "g")
    merged = export_merged(loaded, adapter, tmp_path / "g.onnx").path
    with OrtRunner(merged) as runner:
        _close(runner.infer(feeds), ref)  # the unmerged forward: lm_head keeps the base (tied) table
    branched = export_branched(loaded, tmp_path / "gb.onnx", adapters=[adapter]).path
    with LoraSession(branched) as sess:
        sess.load_adapter("g", gpt2["dir"])
        _close(sess.run(feeds, adapter="g"), ref)
        _close(sess.run(feeds), _peft(gpt2, feeds, None))
    assert _effect(ref, _peft(gpt2, feeds, None)) > 1e-2


# -- refusals: one line, naming the field and what is supported -------------------------------------------------


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_a_dora_adapter_on_a_graph_without_dora_inputs_is_refused(llama):
    d = llama["adapters"]["d"]
    table = SlotTable(INPUTS, {p: Slot(p, m.in_features, m.out_features, "r_0") for p, m in d.modules.items()})
    with pytest.raises(AdapterError) as e:
        table.check_adapter(d)
    _one_line(e, "use_dora", "no DoRA inputs", "--dora")


def test_modules_to_save_without_graph_inputs_is_refused():
    from lora_export.adapters.adapter import Adapter
    from lora_export.adapters.spec import LoraSpec

    adapter = Adapter(LoraSpec(), {}, name="cls", saved={"classifier": {"weight": torch.zeros(2, 4)}})
    with pytest.raises(AdapterError) as e:
        SlotTable(INPUTS, {"q": Slot("q", 4, 4, "r_0")}).check_adapter(adapter)
    _one_line(e, "modules_to_save classifier", "re-export")


def test_a_head_with_another_number_of_labels_is_refused(tmp_path):
    three = build("bert", "seq-cls", num_hidden_layers=1, num_labels=3)
    pm = build_peft(three, r=2, lora_alpha=4, task_type="SEQ_CLS", target_modules=["query"])
    adapter = read_adapter(save_adapter(pm, tmp_path / "three"))
    two = build("bert", "seq-cls", num_hidden_layers=1)
    for export in (
        lambda: export_merged(two, adapter, tmp_path / "m.onnx"),
        lambda: export_branched(two, tmp_path / "b.onnx", adapters=[adapter]),
    ):
        with pytest.raises(AdapterError) as e:
            export()
        _one_line(e, "modules_to_save classifier.", "3 outputs", "has 2", "num_labels=3")
    assert not list(tmp_path.glob("*.onnx"))


def test_an_adapter_for_a_resized_vocabulary_is_refused(llama, tmp_path):
    bigger = build("llama", num_hidden_layers=1)
    bigger.module.resize_token_embeddings(136)
    pm = build_peft(bigger, r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    adapter = read_adapter(save_adapter(pm, tmp_path / "resized"))
    with pytest.raises(AdapterError) as e:
        export_merged(llama["loaded"], adapter, tmp_path / "m.onnx")
    _one_line(e, "save_embedding_layers", "[136, 32]", "[128, 32]", "resized vocabulary", "resize_token_embeddings")


def test_changed_embedding_base_weights_are_refused_by_branched_export(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    src = llama["dirs"]["e"]
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(changed / "adapter_model.safetensors"))
    adapter = read_adapter(changed)
    with pytest.raises(AdapterError) as e:
        export_branched(llama["loaded"], tmp_path / "b.onnx", adapters=[adapter])
    _one_line(e, "save_embedding_layers", "differ", "merge-and-export")
    with LoraSession(llama["graphs"]["inputs"]) as sess, pytest.raises(AdapterError) as e:
        sess.load_adapter("changed", adapter)
    _one_line(e, "save_embedding_layers", "differ", "merge-and-export")


@pytest.mark.parametrize(
    "field, value, supported",
    [("lora_bias", True, "False"), ("bias", "all", "'none'"), ("layer_replication", [[0, 1]], "None")],
)
def test_unsupported_config_fields_are_refused_in_one_line(llama, tmp_path, field, value, supported):
    src = llama["dirs"]["p"]
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    (bad / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError) as e:
        read_adapter(bad)
    _one_line(e, f"{field}=", "is not supported", f"only {supported}")


def test_dora_on_conv2d_merged_matches_peft(sample_cache, tmp_path):
    loaded = sample_cache("convnet")
    pm = build_peft(loaded, seed=7, r=4, lora_alpha=8, target_modules=["conv1", "conv2", "head"], use_dora=True)
    move_dora_magnitudes(pm, "default", 8)
    adapter = read_adapter(save_adapter(pm, tmp_path / "conv"))
    path = export_merged(loaded, adapter, tmp_path / "conv.onnx").path
    feeds = make_feeds(loaded, 2, 16, 0)
    with OrtRunner(path) as runner:
        got = runner.infer(feeds)
    ref = peft_forward(pm, loaded, feeds)
    _close(got, ref)
    with pm.disable_adapter():
        assert _effect(peft_forward(pm, loaded, feeds), ref) > 1e-2

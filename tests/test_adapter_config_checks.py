"""Adapter configs checked against their tensors with PEFT's semantics, and `init_lora_weights` that change the
base refused: one line naming the field (and the config's and the tensors' values), nothing written. Configs
PEFT loads and computes deterministically export exactly as PEFT computes them."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_helpers import assert_one_line_error, run
from peft_oracle import build_peft, fill_lora, max_err, peft_forward

TOL = 1e-4


@pytest.fixture(scope="module")
def valid(sample_cache, tmp_path_factory):
    """A PEFT r=8 adapter on sample:gpt2 (c_attn), saved by PEFT."""
    loaded = sample_cache("gpt2")
    pm = build_peft(loaded, seed=5, r=8, lora_alpha=16, target_modules=["c_attn"])
    out = tmp_path_factory.mktemp("valid") / "adapter"
    pm.save_pretrained(str(out))
    return out


def _edited(src, dst, **edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(edit)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


CONTRADICTIONS = [
    ({"r": 0}, r"r=0 is not a positive integer \(PEFT refuses it\), while the tensors have rank 8"),
    ({"r": -4}, r"r=-4 is not a positive integer .* tensors have rank 8"),
    ({"r": 8.5}, r"r=8\.5 is a float, not an integer .* tensors have rank 8"),
    ({"r": "8"}, r"r='8' is a str, not an integer .* tensors have rank 8"),
    ({"r": 100000}, r"r=100000 but the tensors of transformer\.h\.0\.attn\.c_attn have rank 8"),
    ({"rank_pattern": {"c_attn": 4}}, r"rank_pattern\['c_attn'\]=4 but the tensors of .* have rank 8"),
    ({"target_modules": []}, r"target_modules=\[\] selects no module .* tensors adapt transformer\.h\.0\.attn"),
    (
        {"target_modules": ["does_not_exist"]},
        r"target_modules=\['does_not_exist'\] does not select transformer\.h\.0\.attn\.c_attn and 1 more, which the "
        r"tensors adapt",
    ),
    ({"layers_to_transform": [0]}, r"does not select transformer\.h\.1\.attn\.c_attn.*layers_to_transform=\[0\]"),
    ({"lora_alpha": float("nan")}, r"lora_alpha=nan is not a finite number"),
    ({"alpha_pattern": {"c_attn": float("inf")}}, r"alpha_pattern\['c_attn'\]=inf is not a finite number"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'.*path_initial_model_for_weight_conversion"),
    ({"init_lora_weights": "olora"}, r"init_lora_weights='olora'.*path_initial_model_for_weight_conversion"),
    ({"init_lora_weights": "corda"}, r"init_lora_weights='corda'.*residual base weights"),
    ({"init_lora_weights": "pissa_niter_4"}, r"init_lora_weights='pissa_niter_4'"),
    ({"init_lora_weights": "loftq"}, r"init_lora_weights='loftq'.*quantized base"),
    ({"init_lora_weights": "bogus"}, r"init_lora_weights='bogus' is not a value PEFT knows"),
]


@pytest.mark.parametrize("edit, pattern", CONTRADICTIONS, ids=[json.dumps(e) for e, _ in CONTRADICTIONS])
def test_contradictory_config_refused_in_one_line(valid, tmp_path, edit, pattern):
    from lora_export.adapters.peft_io import read_adapter
    from lora_export.errors import AdapterError

    bad = _edited(valid, tmp_path / "bad", **edit)
    with pytest.raises(AdapterError, match=pattern) as info:
        read_adapter(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("edit", [{"r": 0}, {"target_modules": ["does_not_exist"]}, {"init_lora_weights": "olora"}])
def test_cli_refuses_before_writing(valid, tmp_path, edit):
    bad = _edited(valid, tmp_path / "bad", **edit)
    field = next(iter(edit))
    for cmd in ("merge-and-export", "export-branched"):
        out = tmp_path / f"{cmd}.onnx"
        assert_one_line_error(run(cmd, "sample:gpt2", "--adapter", bad, "-o", out, ok=False), rf"\b{field}=")
        assert not out.exists()
    out = tmp_path / "x.onnx_adapter"
    assert_one_line_error(run("pack-adapter", bad, "-o", out, ok=False), rf"\b{field}=")
    assert not out.exists()


def test_targets_null_take_peft_defaults_for_the_model_type(valid, sample_cache, tmp_path):
    """`target_modules: null`: PEFT uses the model type's defaults (gpt2: c_attn); tensors outside them are
    refused once the model is known."""
    from lora_export.adapters.inject import check_fits
    from lora_export.adapters.peft_io import read_adapter
    from lora_export.errors import AdapterError

    loaded = sample_cache("gpt2")
    check_fits(loaded.module, read_adapter(_edited(valid, tmp_path / "ok", target_modules=None)))
    pm = build_peft(loaded, seed=1, r=2, lora_alpha=4, target_modules=["c_fc"])
    pm.save_pretrained(str(tmp_path / "mlp"))
    mlp = read_adapter(_edited(tmp_path / "mlp", tmp_path / "mlp_null", target_modules=None))
    pattern = r"target_modules=null \(PEFT's defaults for gpt2: \['c_attn'\]\) does not select .*mlp\.c_fc"
    with pytest.raises(AdapterError, match=pattern):
        check_fits(loaded.module, mlp)


def test_edge_cases_peft_accepts_export_equal_to_peft(sample_cache, tmp_path):
    """A negative lora_alpha (PEFT scales by it) and an alpha_pattern without rank_pattern, in one adapter."""
    from lora_export import api
    from lora_export.verify.check import make_feeds

    loaded = sample_cache("gpt2")
    config = dict(r=4, lora_alpha=-12, target_modules=["c_attn", "c_fc"], alpha_pattern={"c_fc": 32})
    pm = build_peft(loaded, seed=11, **config)
    pm.save_pretrained(str(tmp_path / "ad"))
    outcome = api.merge_and_export(loaded, tmp_path / "ad", tmp_path / "m.onnx", verify=False)
    feeds = make_feeds(loaded, 2, 8, 1)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(outcome.export.path), providers=["CPUExecutionProvider"])
    got = dict(zip(loaded.output_names, sess.run(None, feeds)))
    assert max_err(peft_forward(pm, loaded, feeds), got) <= TOL


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_refused_and_peft_conversion_exports_equal(sample_cache, tmp_path, init):
    """A trained PiSSA/OLoRA adapter saved the usual way is refused (merge-and-export, export-branched); the
    conversion the message names (PEFT's `path_initial_model_for_weight_conversion`) gives a plain LoRA adapter
    whose export equals the fine-tuned PEFT model."""
    import copy

    import onnxruntime as ort
    from peft import LoraConfig, get_peft_model

    from lora_export import api
    from lora_export.verify.check import make_feeds

    loaded = sample_cache("llama")
    pm = get_peft_model(
        copy.deepcopy(loaded.module),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init, lora_dropout=0.0),
    )
    pm.peft_config["default"].init_lora_weights = True  # as PEFT's guide: the initial adapter, saved as plain
    pm.save_pretrained(str(tmp_path / "initial"))
    pm.peft_config["default"].init_lora_weights = init
    fill_lora(pm, seed=7)  # "training": A and B moved off their init
    pm.eval()
    pm.save_pretrained(str(tmp_path / "trained"))
    for cmd in ("merge-and-export", "export-branched"):
        out = tmp_path / f"{cmd}.onnx"
        result = run(cmd, "sample:llama", "--adapter", tmp_path / "trained", "-o", out, ok=False)
        assert_one_line_error(result, rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion")
        assert not out.exists()
    if init != "pissa":
        return  # one conversion is enough to show the named step works
    pm.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    outcome = api.merge_and_export(loaded, tmp_path / "converted", tmp_path / "m.onnx", verify=False)
    feeds = make_feeds(loaded, 2, 8, 0)
    sess = ort.InferenceSession(str(outcome.export.path), providers=["CPUExecutionProvider"])
    assert max_err(peft_forward(pm, loaded, feeds), dict(zip(loaded.output_names, sess.run(None, feeds)))) <= TOL

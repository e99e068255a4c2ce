"""Model sources: the sample zoo, local transformers directories, py:module:factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_export.adapters.spec import LoraSpec
from lora_export.adapters.synthetic import random_adapter
from lora_export.errors import UserError
from lora_export.export.branched import export_branched
from lora_export.export.merged import export_merged
from lora_export.models import load_model
from lora_export.models.zoo import SAMPLES
from lora_export.verify.check import verify_graph


def test_samples_are_tiny_and_deterministic():
    for name in ("gpt2", "llama", "bert"):
        a, b = load_model(f"sample:{name}"), load_model(f"sample:{name}")
        params = sum(p.numel() for p in a.module.parameters())
        assert params * 4 < 5e6, f"{name} should be a few MB"
        for (k, v), (_, w) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
            assert torch.equal(v, w), k


def test_example_inputs_per_architecture():
    bert = load_model("sample:bert")
    feeds = bert.make_inputs(3, 10, 0)
    assert list(feeds) == ["input_ids", "attention_mask", "token_type_ids"]
    assert feeds["attention_mask"][1:].sum() < 20  # rows after the first are padded a little
    assert bert.output_names == ["last_hidden_state", "pooler_output"]
    assert load_model("sample:llama").output_names == ["logits"]


def test_unknown_model_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown sample 'gpt3': choose one of"):
        load_model("sample:gpt3")
    with pytest.raises(UserError, match="not found: give a local transformers directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="cannot import the factory"):
        load_model("py:no_such_module:make")


def test_local_transformers_directory_round_trip(tmp_path):
    sample = load_model("sample:llama")
    sample.module.save_pretrained(tmp_path / "llama")
    local = load_model(str(tmp_path / "llama"))
    feeds = sample.make_inputs(2, 7, 0)
    for k, v in sample.forward(feeds).items():
        torch.testing.assert_close(local.forward(feeds)[k], v)


def test_py_factory_model_exports_merged_and_branched(tmp_path):
    loaded = load_model("py:tiny_factory:make")
    assert loaded.input_names == ["features", "scale"] and loaded.output_names == ["output"]
    spec = LoraSpec(r=4, alpha=8, target_modules=["encoder.0", "proj"])
    adapter = random_adapter(loaded.module, spec, seed=3)
    merged = export_merged(loaded, adapter, tmp_path / "m.onnx", seq=0)
    report = verify_graph(loaded, merged.path, [adapter], shapes=[(2, 0), (5, 0)])
    assert report.passed, report.to_dict()
    branched = export_branched(loaded, tmp_path / "b.onnx", adapters=[adapter], seq=0)
    assert verify_graph(loaded, branched.path, [adapter], shapes=[(3, 0)]).passed


def test_zoo_lists_benchmark_shapes():
    assert SAMPLES["gpt2-small"].config["n_embd"] == 768 and SAMPLES["gpt2-small"].config["n_layer"] == 12
    assert SAMPLES["gpt2-medium"].config["n_embd"] == 1024


def test_make_inputs_respects_batch_and_seq():
    loaded = load_model("sample:gpt2")
    feeds = loaded.make_inputs(4, 13, 1)
    assert feeds["input_ids"].shape == (4, 13)
    assert np.all(feeds["input_ids"].numpy() < 1000)

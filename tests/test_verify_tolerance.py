"""The fp32 logits tolerance (`verify.tolerance`): scaled with the logits, raised by the reference's measured
noise, loose enough for a correct export with logits at ±25, tight enough to fail a one-weight 1e-2 edit."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import make_random_adapter
from onnx import numpy_helper

from lora_export.export import decoder as decoder_mod
from lora_export.verify.generation import verify_generation
from lora_export.verify.parity import default_atol
from lora_export.verify.tolerance import FP32_SCALE_TOL, NOISE_SAFETY, fp32_tolerance


def test_tolerance_follows_scale_and_measured_noise():
    ref = np.array([[-30.0, 2.0], [np.inf, 1.0]], np.float32)
    tol = fp32_tolerance(ref)
    assert (tol.scale, tol.basis, tol.atol) == (30.0, "scale", pytest.approx(FP32_SCALE_TOL * 30))
    noisy = fp32_tolerance(ref, noise=1e-4)
    assert (noisy.basis, noisy.atol) == ("noise", pytest.approx(NOISE_SAFETY * 1e-4))
    assert fp32_tolerance(np.zeros(3)).basis == "floor"
    assert default_atol("fp32", ref) == tol.atol  # verify's default is the same function
    assert "max|ref| 30" in tol.describe()


@pytest.fixture(scope="module")
def large_logits(tmp_path_factory, sample_cache):
    """The tiny Llama with its lm_head scaled so logits reach ±25, a merged folder of it with an adapter."""
    import copy

    loaded = copy.copy(sample_cache("llama"))
    loaded.module = copy.deepcopy(loaded.module)
    with torch.no_grad():
        ids = torch.randint(1, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
        top = loaded.module(input_ids=ids).logits.abs().max().item()
        loaded.module.lm_head.weight.mul_(25 / top)
    adapter = make_random_adapter(loaded, seed=3)
    folder = decoder_mod.export_decoder(loaded, tmp_path_factory.mktemp("tol") / "f", adapters=[adapter]).path
    return loaded, adapter, folder


def test_correct_export_with_logits_at_25_passes(large_logits):
    loaded, adapter, folder = large_logits
    report = verify_generation(loaded, folder, [adapter], new_tokens=8, shapes=[(2, 6)])
    assert report.passed, [c.reason for c in report.cases]
    for case in report.cases:
        assert case.tolerance["scale"] > 15 and case.tolerance["noise"] is not None
        assert case.atol == case.tolerance["atol"] >= FP32_SCALE_TOL * case.tolerance["scale"] * 0.95  # 2 digits
        assert case.max_logits_err < case.atol


@pytest.mark.parametrize("weight", ["model.lm_head.weight", "model.model.layers.1.self_attn.o_proj.weight"])
def test_one_weight_edit_of_1e_2_fails(large_logits, tmp_path, weight):
    loaded, adapter, folder = large_logits
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    model = onnx.load(str(edited / "model.onnx"))
    (init,) = [t for t in model.graph.initializer if t.name == weight]
    arr = numpy_helper.to_array(init).copy()
    arr.flat[np.argmax(np.abs(arr))] += 1e-2  # the element that matters most in its tensor
    init.CopyFrom(numpy_helper.from_array(arr, weight))
    onnx.save(model, str(edited / "model.onnx"))
    report = verify_generation(loaded, edited, [adapter], new_tokens=8, shapes=[(2, 6)])
    assert not report.passed
    assert all("logits error" in c.reason or "tokens differ" in c.reason for c in report.cases)

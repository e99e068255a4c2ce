"""verify against PEFT itself, with fp32 tolerances tight enough to see a one-weight corruption.

- PEFT (`PeftModel.from_pretrained`) is the reference when installed, and the report says so; a misread adapter
  (wrong scale, a config whose target_modules leaves out tensors) fails against it, while our own reading
  (`oracle="lora-export"`) agrees with the mistake; a reader with a scaling bug is caught by merge-and-export.
- One weight element changed by 1e-2 in a merged gpt2 / llama / bert graph fails the default fp32 tolerance;
  the untouched graphs pass; fp16 graphs keep their own defaults.
- A 5-adapter bank is checked on every adapter plus a no-adapter row.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from conftest import make_random_adapter
from onnx import numpy_helper

SHAPES = [(2, 9), (3, 5)]
EDITED = {  # a weight of an adapted module, and the element changed by 1e-2
    "gpt2": ("transformer.h.0.attn.c_attn.weight", 100),
    "llama": ("model.layers.1.self_attn.v_proj.weight", 100),
    "bert": ("encoder.layer.1.attention.self.value.weight", 100),
}


@pytest.fixture(scope="module")
def merged(sample_cache, tmp_path_factory):
    """Merged fp32 exports of gpt2, llama, bert (a random adapter each), and an fp16 gpt2 one."""
    from lora_export.export.merged import export_merged

    root = tmp_path_factory.mktemp("merged")
    out = {}
    for arch in EDITED:
        loaded = sample_cache(arch)
        adapter = make_random_adapter(loaded, r=4, seed=2)
        out[arch] = (loaded, adapter, export_merged(loaded, adapter, root / f"{arch}.onnx").path)
    loaded, adapter, _ = out["gpt2"]
    out["gpt2-fp16"] = (loaded, adapter, export_merged(loaded, adapter, root / "fp16.onnx", dtype="fp16").path)
    return out


def _edit(path, out, weight: str, index: int, delta: float = 1e-2):
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name == weight:
            arr = numpy_helper.to_array(t).copy()
            arr.flat[index] += delta
            t.CopyFrom(numpy_helper.from_array(arr, weight))
            onnx.save(model, str(out))
            return out
    raise AssertionError(f"{weight} not in {path}")


@pytest.mark.parametrize("arch", sorted(EDITED))
def test_one_weight_edit_fails_default_fp32_tolerance(merged, tmp_path, arch):
    from lora_export.verify.check import verify_graph

    loaded, adapter, path = merged[arch]
    honest = verify_graph(loaded, path, [adapter], shapes=SHAPES)
    assert honest.passed, honest.to_dict()["summary"]
    edited = verify_graph(loaded, _edit(path, tmp_path / "edited.onnx", *EDITED[arch]), [adapter], shapes=SHAPES)
    assert not edited.passed, edited.to_dict()["summary"]
    worst = max(o.max_abs for c in edited.cases for o in c.outputs)
    tol = max(o.atol for c in edited.cases for o in c.outputs)
    assert tol < worst < 1e-2, (tol, worst)  # caught although far below the old default atol (1e-4) at times
    assert 0 < tol <= 1e-4 and all(o.rtol == 0.0 for c in edited.cases for o in c.outputs)  # the tolerance shown


def test_fp16_graph_keeps_its_own_defaults(merged):
    from lora_export.verify.check import verify_graph
    from lora_export.verify.parity import DEFAULT_TOLERANCES

    loaded, adapter, path = merged["gpt2-fp16"]
    report = verify_graph(loaded, path, [adapter], shapes=SHAPES[:1])
    assert report.passed, report.to_dict()["summary"]
    assert {(o.atol, o.rtol) for c in report.cases for o in c.outputs} == {DEFAULT_TOLERANCES["fp16"]}


def _peft_dir_as(adapter, directory, **config):
    """`adapter` written as a PEFT directory, its config then edited (what the file on disk says)."""
    import json

    from lora_export.adapters.peft_io import write_peft_adapter

    write_peft_adapter(adapter, directory)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return directory


def _read_as(adapter, directory):
    """`adapter` as if our reader had produced it from `directory`: a misreading of that directory."""
    from lora_export.artifacts.fileio import sha256_files

    out = copy.copy(adapter)
    out.source = str(directory)
    out.sha256 = sha256_files([directory / "adapter_config.json", directory / "adapter_model.safetensors"])
    out.extra = {**adapter.extra, "peft_config": str(directory / "adapter_config.json")}
    return out


def test_q_only_config_fails_against_peft(merged, tmp_path):
    """Tensors for q and v, a config that targets q only: PEFT applies q only. Our reader refuses that config;
    a graph exported from a reading that kept v is caught by verify against PEFT."""
    from lora_export.adapters.peft_io import read_adapter
    from lora_export.errors import AdapterError
    from lora_export.verify.check import verify_graph

    loaded, adapter, graph = merged["llama"]  # q_proj and v_proj merged
    q_only = _peft_dir_as(adapter, tmp_path / "q_only", target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"target_modules=\['q_proj'\] does not select .*v_proj"):
        read_adapter(q_only)
    misread = _read_as(adapter, q_only)
    report = verify_graph(loaded, graph, [misread], shapes=SHAPES[:1])
    assert report.reference.startswith("torch+peft") and not report.passed
    ours = verify_graph(loaded, graph, [misread], shapes=SHAPES[:1], oracle="lora-export")
    assert ours.reference == "torch+lora-export" and ours.passed  # our reading agrees with itself


def test_wrong_scale_fails_against_peft_but_not_against_our_own_reading(merged, tmp_path):
    """The graph holds s·B·A; the adapter on disk says s/2 (lora_alpha halved): PEFT disagrees with the export,
    our own reading of the same (mis)read adapter agrees with it — the mistake the old reference let through."""
    from lora_export.verify.check import verify_graph

    loaded, adapter, graph = merged["llama"]
    on_disk = _peft_dir_as(adapter, tmp_path / "half", lora_alpha=adapter.spec.alpha / 2)
    misread = _read_as(adapter, on_disk)
    against_peft = verify_graph(loaded, graph, [misread], shapes=SHAPES[:1])
    assert against_peft.reference.startswith("torch+peft") and not against_peft.passed
    ours = verify_graph(loaded, graph, [misread], shapes=SHAPES[:1], oracle="lora-export")
    assert ours.reference == "torch+lora-export" and ours.passed


def test_a_reader_that_misreads_the_scale_is_caught_end_to_end(sample_cache, tmp_path, monkeypatch):
    """A PEFT-saved adapter and a reader with a scaling bug (2·alpha/r): merge-and-export writes the misread
    graph and its verify against PEFT fails (exit 1, reference named); our own reading as the reference agrees
    with the bug (exit 0), which is why PEFT is the default."""
    from cli_helpers import run
    from peft_oracle import build_peft

    import lora_export.adapters.peft_io as peft_io

    pm = build_peft(sample_cache("gpt2"), seed=4, r=4, lora_alpha=8, target_modules=["c_attn"])
    pm.save_pretrained(str(tmp_path / "ad"))
    real = peft_io.lora_scaling
    monkeypatch.setattr(peft_io, "lora_scaling", lambda *a, **k: 2 * real(*a, **k))
    graph = tmp_path / "m.onnx"
    exported = run("merge-and-export", "sample:gpt2", "--adapter", tmp_path / "ad", "-o", graph, ok=False)
    assert exported.exit_code == 1 and "torch+peft" in exported.output, exported.output
    args = ["verify", "sample:gpt2", "--onnx", graph, "--adapter", tmp_path / "ad", "--shapes", "2x5"]
    assert run(*args, "--oracle", "lora-export").exit_code == 0
    monkeypatch.setattr(peft_io, "lora_scaling", real)
    assert run(*args, ok=False).exit_code == 1  # the graph itself is wrong, whatever reads the adapter


def test_bank_of_five_checks_every_adapter(sample_cache, tmp_path):
    from lora_export.export.branched import export_branched
    from lora_export.verify.check import verify_backends, verify_graph
    from lora_export.verify.options import BackendCheck

    loaded = sample_cache("gpt2")
    ads = [make_random_adapter(loaded, r=(2, 4, 8, 4, 2)[i], seed=20 + i, name=f"ad{i}") for i in range(5)]
    graph = export_branched(loaded, tmp_path / "bank.onnx", adapters=ads, layout="bank", max_rank=8).path
    report = verify_graph(loaded, graph, ads, shapes=[(2, 6), (1, 4)])
    assert report.passed, report.to_dict()["summary"]
    assert report.checks["bank_rows"] == {"adapters": 5, "no_adapter_row": True, "passed": True, "reason": ""}
    assert all(c.label.split()[1] == "batch=6" for c in report.cases)  # 5 adapters + 1 base row in each case
    # the fifth adapter is really checked: feed the graph a different one in its place and the rows disagree
    check = BackendCheck(onnx_path=graph, shapes=[(1, 4)], check_effect=False)
    swapped = verify_backends(loaded, ads, check, candidate_adapters=[*ads[:4], ads[0]])
    assert not swapped.passed


def test_reference_is_stated_in_the_cli_report(merged, tmp_path):
    import json

    from cli_helpers import run

    from lora_export.adapters.peft_io import write_peft_adapter

    _, adapter, graph = merged["gpt2"]
    ad = write_peft_adapter(adapter, tmp_path / "ad")
    args = ["verify", "sample:gpt2", "--onnx", graph, "--adapter", ad, "--shapes", "2x5"]
    result = run(*args, "--json", tmp_path / "r.json")
    assert "torch+peft" in result.output and "tolerance" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["reference"].startswith("torch+peft") and report["passed"]
    assert run(*args, "--oracle", "lora-export").output.count("torch+lora-export") == 1


def test_peft_refusing_an_adapter_is_one_line(sample_cache, tmp_path):
    """An adapter we accept but PEFT cannot load is a disagreement: a one-line error, not a pass."""
    import torch

    from lora_export.adapters.adapter import ModuleLora
    from lora_export.errors import UserError
    from lora_export.verify.peft_reference import PeftSide

    loaded = sample_cache("gpt2")
    adapter = make_random_adapter(loaded, r=4, seed=1)
    bad = ModuleLora(A=torch.ones(4, 48), B=torch.ones(192, 4), scaling=1.0)  # c_attn's input has 64 features
    adapter.modules = {**adapter.modules, "transformer.h.0.attn.c_attn": bad}
    with pytest.raises(UserError, match=r"PEFT cannot load adapter .*--oracle lora-export"):
        PeftSide(loaded, [adapter]).__enter__()


def test_merged_graph_honest_error_is_far_below_the_default(merged):
    """The margin the default is built on: honest fp32 error well under the scaled atol."""
    from lora_export.verify.check import verify_graph

    loaded, adapter, path = merged["gpt2"]
    report = verify_graph(loaded, path, [adapter], shapes=SHAPES)
    for c in report.cases:
        for o in c.outputs:
            assert o.max_abs * 3 < o.atol, (o.max_abs, o.atol)
    assert np.isfinite(report.checks["adapter_effect"]["effect_max_abs"])

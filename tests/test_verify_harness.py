"""verify across backends: passes on the right graph, fails on a dropped adapter or a perturbed weight."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_random_adapter

from lora_export.cli import cli
from lora_export.verify.check import verify_backends, verify_graph
from lora_export.verify.options import BackendCheck
from lora_export.verify.parity import ParityReport

SHAPES = [(2, 8), (1, 5)]


@pytest.fixture(scope="module")
def gpt2_setup(sample_cache, export_cache, tmp_path_factory):
    """The tiny GPT-2, an adapter (B non-zero) and its PEFT dir, a branched graph, a base-model graph."""
    from lora_export.adapters.peft_io import write_peft_adapter
    from lora_export.export.merged import export_merged

    loaded = sample_cache("gpt2")
    adapter = make_random_adapter(loaded, seed=3, name="x")
    root = tmp_path_factory.mktemp("verify")
    write_peft_adapter(adapter, root / "adapter_x", base_model="sample:gpt2")
    base = root / "base.onnx"
    export_merged(loaded, None, base)
    return {
        "loaded": loaded,
        "adapter": adapter,
        "dir": root / "adapter_x",
        "branched": export_cache("gpt2"),
        "base": base,
    }


def perturbed_copy(path, out, scale=0.02):
    """The graph with one base weight nudged (a float initializer that is not a LoRA slot)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = [i for i in model.graph.initializer if ".lora_" not in i.name and i.data_type == onnx.TensorProto.FLOAT]
    target = max(inits, key=lambda i: np.prod(i.dims) if len(i.dims) == 2 and "wte" not in i.name else 0)
    w = numpy_helper.to_array(target)
    noisy = w + scale * np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
    target.CopyFrom(numpy_helper.from_array(noisy, target.name))
    onnx.save(model, str(out))
    return target.name


def test_passes_on_the_correct_branched_graph(gpt2_setup):
    s = gpt2_setup
    rep = verify_graph(s["loaded"], s["branched"], [s["adapter"]], shapes=SHAPES, seeds=[0, 1])
    assert rep.passed, rep.to_dict()
    assert len(rep.cases) == 4
    effect = rep.checks["adapter_effect"]
    assert effect["passed"] and effect["effect_max_abs"] > 100 * effect["parity_max_abs"]


def test_fails_when_the_candidate_drops_the_adapter(gpt2_setup):
    s = gpt2_setup
    rep = verify_backends(
        s["loaded"], [s["adapter"]], BackendCheck(onnx_path=s["branched"], shapes=SHAPES), candidate_adapters=[]
    )  # the graph runs with its rank-0 defaults: the base model
    assert not rep.passed
    assert not any(c.passed for c in rep.cases)
    assert not rep.checks["adapter_effect"]["passed"]  # effect ~ parity error: cannot be told apart


def test_fails_on_a_base_model_graph_verified_with_an_adapter(gpt2_setup):
    s = gpt2_setup
    rep = verify_graph(s["loaded"], s["base"], [s["adapter"]], shapes=SHAPES)
    assert not rep.passed and not any(c.passed for c in rep.cases)
    # and the same graph verified as what it is (no adapter) passes
    assert verify_graph(s["loaded"], s["base"], [], shapes=SHAPES).passed


def test_fails_on_a_perturbed_weight_and_keeps_the_inputs(gpt2_setup, tmp_path):
    s = gpt2_setup
    bad = tmp_path / "perturbed.onnx"
    perturbed_copy(s["branched"], bad)
    keep = tmp_path / "failing"
    rep = verify_backends(s["loaded"], [s["adapter"]], BackendCheck(onnx_path=bad, shapes=SHAPES, save_inputs=keep))
    assert not rep.passed
    failing = [c for c in rep.cases if not c.passed]
    assert failing and len(rep.artifacts) == 2 * len(failing)
    inputs = np.load(keep / "seed_0_batch_2_seq_8.inputs.npz")
    assert inputs["input_ids"].shape == (2, 8)
    assert any(k.endswith(".lora_A.weight") for k in inputs.files)  # everything the candidate was fed
    outs = np.load(keep / "seed_0_batch_2_seq_8.outputs.npz")
    assert {"reference.logits", "candidate.logits"} <= set(outs.files)


def test_graph_vs_graph_and_torch_as_candidate(gpt2_setup):
    s = gpt2_setup
    check = BackendCheck(reference="ort", candidate="torch", onnx_path=s["branched"], shapes=SHAPES)
    rep = verify_backends(s["loaded"], [s["adapter"]], check)
    assert rep.passed and rep.reference.startswith("ort:") and rep.candidate.startswith("torch+peft")
    assert rep.checks["adapter_effect"]["passed"]


def test_bank_graph_rows_each_checked_against_their_adapter(sample_cache, export_cache):
    loaded = sample_cache("gpt2")
    ads = [make_random_adapter(loaded, seed=i, r=r) for i, r in enumerate((4, 8))]
    rep = verify_graph(loaded, export_cache("gpt2", "bank"), ads, shapes=[(3, 6)])
    assert rep.passed, rep.to_dict()


def test_per_output_tolerances_decide(gpt2_setup):
    s = gpt2_setup
    rep = verify_graph(
        s["loaded"], s["branched"], [s["adapter"]], shapes=SHAPES[:1], atol={"logits": 0.0}, rtol={"*": 0.0}
    )
    o = rep.cases[0].outputs[0]
    assert (o.atol, o.rtol) == (0.0, 0.0)
    assert o.passed == (o.max_abs == 0.0)


def test_parity_report_round_trips_through_json(gpt2_setup):
    s = gpt2_setup
    rep = verify_graph(s["loaded"], s["base"], [s["adapter"]], shapes=SHAPES[:1])
    data = json.loads(json.dumps(rep.to_dict()))
    back = ParityReport.from_dict(data)
    assert back.to_dict() == rep.to_dict()
    assert back.passed == rep.passed is False
    assert back.worst() == rep.worst()
    summary = rep.summary()
    assert summary["logits"]["cases"] == 1 and summary["logits"]["passed"] == 0


def test_cli_verify_pass_fail_and_save_inputs(gpt2_setup, tmp_path):
    s = gpt2_setup
    runner = CliRunner()
    ok = runner.invoke(
        cli,
        [
            "verify",
            "sample:gpt2",
            "--onnx",
            str(s["branched"]),
            "--adapter",
            str(s["dir"]),
            "--batch",
            "1,2",
            "--seq-len",
            "6",
        ]
        + ["--seeds", "0,1", "--atol", "logits:1e-4", "--json", str(tmp_path / "r.json")],
    )
    assert ok.exit_code == 0, ok.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] and len(data["cases"]) == 4 and data["cases"][0]["outputs"][0]["atol"] == 1e-4
    bad = runner.invoke(
        cli,
        ["verify", "sample:gpt2", "--onnx", str(s["base"]), "--adapter", str(s["dir"]), "--shapes", "2x8"]
        + ["--save-inputs", str(tmp_path / "keep")],
    )
    assert bad.exit_code == 1, bad.output
    assert "verification failed" in bad.output and "Traceback" not in bad.output
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == [
        "seed_0_batch_2_seq_8.inputs.npz",
        "seed_0_batch_2_seq_8.outputs.npz",
    ]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--candidate", "trt", "--engine", "missing.plan"], 3, ""),  # no TensorRT / GPU here: exit 3, one line
        (["--reference", "ort", "--candidate", "ort"], 2, "both 'ort'"),
        (["--candidate", "trt"], 2, "needs an engine"),
        (["--shapes", "2y8"], 2, "--shapes"),
    ],
)
def test_cli_verify_user_errors(gpt2_setup, args, code, message):
    res = CliRunner().invoke(cli, ["verify", "sample:gpt2", "--onnx", str(gpt2_setup["branched"]), *args])
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in res.output

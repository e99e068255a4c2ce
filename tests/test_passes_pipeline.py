"""The full pipeline and `lora-export optimize`: contract, manifests, packed adapters, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from conftest import make_random_adapter

from lora_export.cli import cli
from lora_export.contract import is_lora_tensor
from lora_export.passes import optimize_file
from lora_export.passes.contract import lora_node_count


def _feeds(loaded, batch=2, seq=7, seed=1):
    return {k: v.numpy() for k, v in loaded.make_inputs(batch, seq, seed).items()}


@pytest.mark.parametrize("fuse", [False, True])
def test_packed_adapter_for_unoptimized_graph_loads_into_optimized(fuse, export_cache, sample_cache, tmp_path):
    from lora_export.adapters.pack import pack_adapter
    from lora_export.runtime import LoraSession

    src = export_cache("llama")
    out = tmp_path / "opt.onnx"
    report = optimize_file(src, out, fuse_siblings=fuse)
    loaded = sample_cache("llama")
    adapter = make_random_adapter(loaded, r=3, seed=7)
    packed = pack_adapter(adapter, tmp_path / "a.onnx_adapter", graph=src)  # packed against the original graph
    feeds = _feeds(loaded)
    results = []
    for path in (src, out):
        with LoraSession(path) as sess:
            sess.load_adapter("a", packed)
            results.append(sess.run(feeds, adapter="a")["logits"])
    np.testing.assert_allclose(results[1], results[0], atol=1e-5, rtol=1e-5)
    # the name contract, read from the written graph
    before, after = ir.load(src), ir.load(out)
    names = lambda m: [(v.name, str(v.shape), v.dtype) for v in m.graph.inputs]  # noqa: E731
    assert names(before) == names(after)
    for v in after.graph.inputs:
        if is_lora_tensor(v.name):
            assert after.graph.initializers[v.name] is v and 0 in v.const_value.shape
    assert report["after"]["lora"]["matmuls"] == (6 if fuse else 8)


def test_pipeline_on_bank_graph_keeps_slots(export_cache, sample_cache, tmp_path):
    from lora_export.verify.check import verify_graph

    src = export_cache("gpt2", "bank")
    out = tmp_path / "bank.opt.onnx"
    optimize_file(src, out, fp16=True)
    loaded = sample_cache("gpt2")
    ads = [make_random_adapter(loaded, r=4, seed=s) for s in (1, 2)]
    report = verify_graph(loaded, out, ads, shapes=[(3, 8)])
    assert report.passed, report.worst()
    assert lora_node_count(ir.load(out))["matmuls"] == 4


def test_cli_optimize_report_manifest_and_bake(export_cache, sample_cache, tmp_path):
    from lora_export.adapters.pack import pack_adapter

    src = export_cache("gpt2")
    out = tmp_path / "o.onnx"
    runner = CliRunner()
    args = [
        "optimize",
        str(src),
        "-o",
        str(out),
        "--report",
        "--bench",
        "--seq-len",
        "8",
        "--json",
        str(tmp_path / "r.json"),
    ]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "nodes by op type" in res.output and "initializer bytes" in res.output and "latency" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["bench"]["ratio_after_before"]["value"] > 0
    manifest = json.loads((tmp_path / "o.onnx.json").read_text())
    assert manifest["kind"] == "branched-inputs" and "optimized" in manifest
    assert [i["name"] for i in manifest["lora_inputs"]] == [
        i["name"] for i in json.loads(open(str(src) + ".json").read())["lora_inputs"]
    ]
    # exists without --force: one line, exit 2, file untouched
    mtime = out.stat().st_mtime_ns
    res = runner.invoke(cli, ["optimize", str(src), "-o", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output and out.stat().st_mtime_ns == mtime
    # --bake: a merged graph
    adapter = make_random_adapter(sample_cache("gpt2"), r=4, seed=9)
    packed = pack_adapter(adapter, tmp_path / "a.onnx_adapter")
    baked = tmp_path / "baked.onnx"
    res = runner.invoke(cli, ["optimize", str(src), "-o", str(baked), "--bake", str(packed)])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "baked.onnx.json").read_text())
    assert m["kind"] == "merged" and m["lora_inputs"] == [] and m["optimized"]["options"]["bake"] == "a"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bake", "BANK"], "bank graph"),
        (["--bake", "missing_adapter_dir"], "does not exist"),
    ],
)
def test_cli_optimize_user_errors_write_nothing(args, message, export_cache, sample_cache, tmp_path):
    from lora_export.adapters.pack import pack_adapter

    src = export_cache("gpt2", "bank")
    if "BANK" in args:
        args = [
            "--bake",
            str(pack_adapter(make_random_adapter(sample_cache("gpt2"), r=2), tmp_path / "a.onnx_adapter")),
        ]
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(cli, ["optimize", str(src), "-o", str(out), *args])
    assert res.exit_code == 2 and message in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "out.onnx.json").exists()


def test_cli_optimize_rejects_non_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a graph")
    res = CliRunner().invoke(cli, ["optimize", str(bad), "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "cannot read" in res.output and not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_target_ort_fuses_and_keeps_weights_in_their_layout(arch, export_cache, sample_cache, tmp_path):
    """ORT folds Transpose(W) into W under W's name; the pass puts W back behind a Transpose node."""
    from lora_export.verify.check import verify_graph

    src = export_cache(arch)
    out = tmp_path / "ort.onnx"
    report = optimize_file(src, out, target="ort", fp16=True)
    assert any("fusions applied" in n for n in report["notes"]), report["notes"]
    model = ir.load(out)
    assert any(n.domain == "com.microsoft" or n.op_type.startswith("Simplified") for n in model.graph)
    before = ir.load(src)
    for name, w in before.graph.initializers.items():
        if name.endswith("proj.weight") or name.endswith("query.weight"):
            got = model.graph.initializers[name].const_value.numpy()  # float16 now, same layout and name
            np.testing.assert_array_equal(got, w.const_value.numpy().astype(np.float16))
    loaded = sample_cache(arch)
    rep = verify_graph(loaded, out, [make_random_adapter(loaded, r=4, seed=2)], shapes=[(2, 8)])
    assert rep.passed, rep.worst()


def test_bake_from_peft_dir_matches_merge_and_export(export_cache, sample_cache, tmp_path):
    from lora_export.adapters.peft_io import write_peft_adapter
    from lora_export.backends.onnxrt import OrtRunner
    from lora_export.export.merged import export_merged

    loaded = sample_cache("llama")
    adapter = make_random_adapter(loaded, r=6, alpha=12, seed=4, use_rslora=True)
    peft_dir = write_peft_adapter(adapter, tmp_path / "peft")
    report = optimize_file(export_cache("llama"), tmp_path / "baked.onnx", bake=peft_dir)
    assert report["after"]["lora_inputs"] == 0
    export_merged(loaded, adapter, tmp_path / "merged.onnx")
    feeds = _feeds(loaded)
    with OrtRunner(tmp_path / "merged.onnx") as a, OrtRunner(tmp_path / "baked.onnx") as b:
        np.testing.assert_allclose(b.infer(feeds)["logits"], a.infer(feeds)["logits"], atol=1e-5, rtol=1e-5)

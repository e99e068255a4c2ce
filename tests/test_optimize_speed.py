"""`lora-export optimize --fuse / --quantize` end to end: the manifest records what was done, decoder folders keep
their greedy tokens after fusion and stay close after quantization, and bad requests are one line each."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run

PROMPTS = [[11, 23, 5, 64, 8, 99, 7], [3, 17, 250], [41, 42, 43, 44, 45]]  # different lengths: left padding
NEW = 12


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, sample_cache):
    """arch -> inputs-layout decoder folder with adapter `x` (seeded, non-zero B)."""
    from conftest import make_random_adapter

    from lora_export.export.decoder import export_decoder

    root = tmp_path_factory.mktemp("decoders")
    cache = {}

    def get(arch):
        if arch not in cache:
            loaded = sample_cache(arch)
            adapter = make_random_adapter(loaded, r=8, alpha=32, seed=21, name="x")
            cache[arch] = export_decoder(loaded, root / arch, adapters=[adapter], layout="inputs").path
        return cache[arch]

    return get


def _tokens(folder, adapter):
    from lora_export.runtime.generator import Generator

    with Generator(folder) as gen:
        return gen.generate(PROMPTS, adapter=adapter, max_new_tokens=NEW, ignore_eos=True).tokens


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_folder_after_fusion_keeps_greedy_tokens(arch, decoders, tmp_path):
    src = decoders(arch)
    out = tmp_path / "fused"
    result = run("optimize", src, "-o", out, "--fuse", "all", "--report")
    assert "MultiHeadAttention" in result.output  # the --report fusion table
    manifest = json.loads((out / "model.onnx.json").read_text())
    fused = manifest["optimized"]["fusions"]
    assert any(k.startswith("MultiHeadAttention") for k in fused) and fused.get("SDPA", 0) >= 2
    assert (out / "adapters" / "x.onnx_adapter").is_file() and (out / "genai_config.json").is_file()
    for adapter in ("x", None):
        assert _tokens(out, adapter) == _tokens(src, adapter), adapter
    assert _genai_tokens(out) == _genai_tokens(src)  # ONNX Runtime GenAI runs the fused folder too


def _genai_tokens(folder):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPTS[0]) + NEW, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([PROMPTS[0]])
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]


def test_quantized_decoder_folder_keeps_adapters_and_most_greedy_tokens(decoders, tmp_path):
    src = decoders("gpt2")
    out = tmp_path / "int8"
    run("optimize", src, "-o", out, "--quantize", "int8")
    q = json.loads((out / "model.onnx.json").read_text())["quantization"]
    assert q["scheme"] == "int8" and q["nodes_quantized"] >= 8 and q["lora_nodes_kept_float"] >= 4
    agree = {}
    for adapter in ("x", None):
        want, got = np.array(_tokens(src, adapter)), np.array(_tokens(out, adapter))
        agree[adapter] = float((want == got).mean())
        assert (got[:, 0] == want[:, 0]).all()  # the first token of every row (prefill) agrees
    assert min(agree.values()) >= 0.75, agree
    assert _tokens(out, "x") != _tokens(out, None)  # the float adapter still steers the int8 base
    # `verify` on the folder: against transformers generate, with quantization-fit criteria
    result = run("verify", "sample:gpt2", "--onnx", out, ok=False)
    assert result.exit_code == 0, result.output
    assert "(int8 base): greedy-token agreement" in result.output


def test_manifest_records_int4_quantization(export_cache, tmp_path):
    out = tmp_path / "int4.onnx"
    run("optimize", export_cache("llama"), "-o", out, "--quantize", "int4", "--block-size", "16")
    manifest = json.loads(out.with_name("int4.onnx.json").read_text())
    q = manifest["quantization"]
    assert (q["scheme"], q["block_size"]) == ("int4", 16)
    assert q["quantized_ops"] == {"MatMulNBits": q["nodes_quantized"]} and q["nodes_quantized"] == 15
    assert len(q["quantized_nodes"]) == 15 and all(
        w.endswith(".weight.T") or w.endswith(".weight") for w in q["weights_quantized"]
    )
    assert manifest["optimized"]["options"]["quantize"] == "int4"
    assert [i["name"] for i in manifest["lora_inputs"]]  # the LoRA slots are still listed


def test_verify_cli_passes_a_quantized_branched_graph(export_cache, adapter_dir, tmp_path):
    out = tmp_path / "q.onnx"
    run("optimize", export_cache("gpt2"), "-o", out, "--quantize", "int8")
    result = run("verify", "sample:gpt2", "--onnx", out, "--adapter", adapter_dir, ok=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def quantized_gpt2(tmp_path_factory, export_cache):
    out = tmp_path_factory.mktemp("q") / "q.onnx"
    run("optimize", export_cache("gpt2"), "-o", out, "--quantize", "int8")
    return out


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--quantize", "int8"], r"already quantized \(.*\): quantize the float graph instead"),
        (["--bake", "ADAPTER"], r"--bake needs the unquantized graph"),
    ],
)
def test_quantized_graph_refuses_a_second_quantization_and_bake(args, pattern, quantized_gpt2, adapter_dir, tmp_path):
    args = [str(adapter_dir) if a == "ADAPTER" else a for a in args]
    out = tmp_path / "again.onnx"
    assert_one_line_error(run("optimize", quantized_gpt2, "-o", out, *args, ok=False), pattern)
    assert not out.exists()


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--quantize", "int3"], r"unknown quantization scheme 'int3': choose one of int8, int8-block, int4"),
        (["--quantize", "int8", "--block-size", "32"], r"--block-size applies to --quantize int8-block or int4"),
        (["--quantize", "int4", "--block-size", "33"], r"--block-size 33: choose one of"),
        (["--quantize", "int8", "--fp16"], r"drop --fp16"),
        (["--fuse", "norm,flash"], r"unknown fusion 'flash'"),
    ],
)
def test_bad_quantize_and_fuse_options(args, pattern, export_cache, tmp_path):
    out = tmp_path / "x.onnx"
    assert_one_line_error(run("optimize", export_cache("gpt2"), "-o", out, *args, ok=False), pattern)
    assert not out.exists()

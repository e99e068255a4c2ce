"""`generate` and `verify` on decoder folders through the CLI, and one clear line for each bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_helpers import assert_one_line_error, run
from decoder_setup import PROMPTS

from lora_export.errors import UserError
from lora_export.runtime import Generator


def _ids(prompt):
    return ",".join(str(t) for t in prompt)


def test_generate_streams_ids_and_reports_json(decoders):
    folder = decoders.folder("gpt2", "inputs")
    with Generator(folder) as gen:
        ref = gen.generate(PROMPTS[0], adapter="x", max_new_tokens=6, ignore_eos=True).tokens[0]
    streamed = run("generate", folder, "--prompt-ids", _ids(PROMPTS[0]), "--adapter", "x", "--max-new-tokens", 6,
                   "--ignore-eos")  # fmt: skip
    assert [int(t) for t in streamed.stdout.split()] == ref
    out = run("generate", folder, "--prompt-ids", _ids(PROMPTS[0]), "--adapter", "x", "--max-new-tokens", 6,
              "--ignore-eos", "--json")  # fmt: skip
    report = json.loads(out.stdout)
    assert report["tokens"] == ref and report["finish_reason"] == "length" and report["ttft_ms"] > 0
    assert report["ms_per_token"] > 0 and report["prompt_ids"] == PROMPTS[0]
    x_dir = decoders.model("gpt2")["dirs"]["x"]
    by_path = run("generate", folder, "--prompt-ids", _ids(PROMPTS[0]), "--adapter", x_dir, "--max-new-tokens", 6,
                  "--ignore-eos", "--json")  # fmt: skip
    assert json.loads(by_path.stdout)["tokens"] == ref  # the PEFT directory loads as an adapter too
    sampled = [
        json.loads(
            run(
                "generate", folder, "--prompt-ids", "5,6,7", "--temperature", 1.0, "--top-k", 40, "--seed", 11, "--json"
            ).stdout
        )["tokens"]  # fmt: skip
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_generate_streams_text_with_the_folder_tokenizer(decoders, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "with_tokenizer"
    shutil.copytree(decoders.folder("gpt2", "merged"), folder)
    vocab = {f"w{i}": i for i in range(1000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    with Generator(folder) as gen:
        ids = gen.encode("w11 w23 w5")
        tokens = gen.generate(ids, max_new_tokens=5, ignore_eos=True).tokens[0]
    assert ids == [11, 23, 5]
    out = run("generate", folder, "--prompt", "w11 w23 w5", "--max-new-tokens", 5, "--ignore-eos")
    assert out.stdout.split() == [f"w{t}" for t in tokens]


def test_verify_checks_generation_of_a_decoder_folder(decoders, tmp_path):
    m = decoders.model("gpt2")
    folder = decoders.folder("gpt2", "bank")
    report = tmp_path / "r.json"
    out = run("verify", "sample:gpt2", "--onnx", folder, "--adapter", m["dirs"]["x"], "--adapter", m["dirs"]["y"],
              "--shapes", "3x7", "--new-tokens", 6, "--json", report)  # fmt: skip
    assert "token-exact" in out.stdout
    data = json.loads(report.read_text())
    assert data["passed"] and data["cases"][0]["adapters"] == ["x", "y", None]
    assert data["cases"][0]["max_logits_err"] < 1e-4 and data["cases"][0]["effect"] > 1e-2
    # the merged folder holds x: checked against y, the tokens differ and verify fails (exit 1)
    merged = decoders.folder("gpt2", "merged")
    ok = run("verify", "sample:gpt2", "--onnx", merged, "--adapter", m["dirs"]["x"], "--shapes", "1x5")
    assert "token-exact" in ok.stdout
    wrong = run("verify", "sample:gpt2", "--onnx", merged, "--adapter", m["dirs"]["y"], "--shapes", "1x5", ok=False)
    assert wrong.exit_code == 1 and "FAIL" in wrong.stdout


def test_bad_inputs_are_one_clear_line(decoders, tmp_path):
    inputs = decoders.folder("gpt2", "inputs")
    out = tmp_path / "enc"
    assert_one_line_error(run("export-decoder", "sample:bert", "-o", out, ok=False), "export-decoder is for causal LMs")
    assert not out.exists()  # nothing half-written
    long_prompt = _ids(list(range(1, 258)))  # the sample's context is 256
    assert_one_line_error(
        run("generate", inputs, "--prompt-ids", long_prompt, ok=False), "longer than the model's context"
    )
    assert_one_line_error(
        run("generate", inputs, "--prompt-ids", "1,2", "--adapter", "nope", ok=False), "no adapter named 'nope'"
    )
    assert_one_line_error(run("generate", inputs, "--prompt", "hello", ok=False), "has no tokenizer files")
    for missing in ("genai_config.json", "model.onnx"):
        broken = tmp_path / f"no_{missing}"
        shutil.copytree(inputs, broken)
        (broken / missing).unlink()
        assert_one_line_error(run("generate", broken, "--prompt-ids", "1,2", ok=False), f"has no {missing}")
    with Generator(inputs) as gen:
        with pytest.raises(UserError, match="per-row adapters need a bank folder") as e:
            gen.generate(PROMPTS[:2], adapters=["x", "y"])
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match="no adapter named 'z' is loaded"):
            gen.prefill(PROMPTS[:1], adapter="z")
    with Generator(decoders.folder("gpt2", "merged")) as merged:
        with pytest.raises(UserError, match="merged decoder"):
            merged.generate(PROMPTS[0], adapter="x")


def test_export_decoder_refuses_before_writing(decoders, tmp_path):
    m = decoders.model("gpt2")
    out = tmp_path / "two"
    result = run("export-decoder", "sample:gpt2", "-o", out, "--adapter", m["dirs"]["x"], "--adapter", m["dirs"]["y"],
                 ok=False)  # fmt: skip
    assert_one_line_error(result, "layout merged folds one adapter")
    assert not out.exists()
    existing = decoders.folder("gpt2", "merged")
    assert_one_line_error(run("export-decoder", "sample:gpt2", "-o", existing, ok=False), "already exists")


def test_tokenizer_files_are_copied_from_a_model_directory(tmp_path):
    from lora_export.export.decoder_result import copy_tokenizer

    src = tmp_path / "model"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (src / name).write_text("{}")
    dst = tmp_path / "out"
    dst.mkdir()
    assert copy_tokenizer(str(src), dst) == ["tokenizer.json", "tokenizer_config.json"]
    assert copy_tokenizer("sample:gpt2", dst) == []
    (dst / "tokenizer.json").write_text('{"builder": 1}')  # the builder's own: kept
    (dst / "tokenizer_config.json").unlink()  # missing: copied
    assert copy_tokenizer(str(src), dst, keep_existing=True) == ["tokenizer_config.json"]
    assert (dst / "tokenizer.json").read_text() == '{"builder": 1}'


def test_inspect_describes_a_decoder_folder(decoders):
    folder = decoders.folder("gpt2", "inputs")
    info = json.loads(run("inspect", folder, "--json").stdout)
    assert info["kind"] == "decoder folder" and info["layout"] == "inputs"
    assert info["packed adapters"] == "x, y" and info["lora_modules"] > 0 and info["layers"] >= 1
    assert info["vocab"] > 0 and info["context"] > 0
    table = run("inspect", folder).stdout
    assert "decoder folder" in table and "kv heads" in table

"""The trained sample `sample:e2e`: shipped files load offline, adapters load in PEFT and do their job,
data and training are reproducible from their seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lora_export.errors import UserError
from lora_export.models import e2e
from lora_export.models.e2e import data
from lora_export.verify.options import TaskCheck

ROOT = Path(__file__).resolve().parents[1]

# Measured on the shipped sample (dev split, 100 MRs, greedy, transformers generate): description adapter
# BLEU 53.0, base model 0.0 (it answers an MR with "."). Thresholds with margin:
DEV_BLEU_ADAPTER_MIN = 40.0
DEV_BLEU_BASE_MAX = 5.0


def _train_module():
    from lora_export.models.e2e import train

    return train


@pytest.fixture(scope="module")
def base():
    from lora_export.verify.task_run import load_causal_lm

    return load_causal_lm(e2e.model_dir())


@pytest.fixture(scope="module")
def tokenizer():
    from lora_export.verify.task_run import load_tokenizer

    return load_tokenizer(e2e.model_dir())


def test_shipped_sample_loads_offline(monkeypatch, tokenizer):
    from lora_export.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("sample:e2e")
    assert loaded.arch == "gpt2" and loaded.output_names == ["logits"]
    assert loaded.module.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token_id == loaded.module.config.eos_token_id == 0
    ids = tokenizer(data.prompt("name[The Eagle] | food[French]"))["input_ids"]
    assert tokenizer.decode(ids) == "name[The Eagle] | food[French]\n"
    size = sum(p.stat().st_size for p in e2e.FILES.rglob("*") if p.is_file())
    assert size < 8 * 2**20, f"the shipped sample grew to {size / 2**20:.1f} MiB"


def test_adapters_load_in_peft_with_trained_b(base):
    import copy

    from peft import PeftModel

    from lora_export.models.sources import open_adapter

    for name in e2e.ADAPTERS:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(e2e.adapter_dir(name)))
        bs = {k: v for k, v in peft_model.state_dict().items() if "lora_B" in k}
        assert bs and all(float(v.abs().max()) > 1e-2 for v in bs.values()), f"{name}: lora_B not trained"
        ours = open_adapter(f"sample:e2e/{name}")
        assert ours.name == name
        assert set(ours.modules) == {f"transformer.h.{i}.attn.c_attn" for i in range(base.config.n_layer)}
        key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"
        peft_b = peft_model.state_dict()[key]
        assert torch.allclose(ours.modules["transformer.h.0.attn.c_attn"].B.float(), peft_b.float())


def test_sample_adapter_names():
    from lora_export.adapters.peft_io import read_adapter
    from lora_export.errors import AdapterError
    from lora_export.models.sources import open_adapter

    assert e2e.adapter_specs() == ["sample:e2e/description", "sample:e2e/review"]
    assert e2e.resolve_adapter("sample:e2e/review") == e2e.adapter_dir("review")
    with pytest.raises(UserError, match="no adapter 'poem'"):
        open_adapter("sample:e2e/poem")
    with pytest.raises(AdapterError, match="does not exist"):  # the PEFT reader reads files, not sample names
        read_adapter("sample:e2e/review")


def test_adapter_beats_base_on_dev(base):
    """PEFT with the description adapter, transformers generate (greedy), BLEU on the dev split."""
    import copy

    from peft import PeftModel

    from lora_export.verify.task_run import evaluate, torch_generator

    records = e2e.records("dev")
    prompts = [data.prompt(r.mr) for r in records]
    refs = [r.description for r in records]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(e2e.adapter_dir("description"))).eval()
    tuned = evaluate("peft", "description", torch_generator(e2e.model_dir(), model=peft_model), prompts, refs)
    plain = evaluate("base", "", torch_generator(e2e.model_dir(), model=base), prompts, refs)
    assert tuned.scores.bleu >= DEV_BLEU_ADAPTER_MIN, tuned.outputs[:3]
    assert plain.scores.bleu <= DEV_BLEU_BASE_MAX, plain.outputs[:3]
    assert tuned.scores.rouge_l > plain.scores.rouge_l + 20


def test_data_generator_reproduces_shipped_splits(tmp_path):
    from lora_export.artifacts.fileio import sha256_file

    cfg = _train_module().TrainConfig().data
    splits = data.make_splits(cfg)
    paths = data.write_splits({k: v for k, v in splits.items() if k != "train"}, tmp_path / "a")
    for p in paths:
        assert sha256_file(p) == sha256_file(e2e.FILES / "data" / p.name), p.name
    other = data.make_splits(data.DataConfig(seed=cfg.seed + 1, train=10, dev=5, test=5))
    assert [r.mr for r in other["test"]] != [r.mr for r in splits["test"][:5]]
    train_mrs = {r.mr for r in splits["train"]}
    assert not train_mrs & {r.mr for r in splits["test"]}, "test MRs leak into training"


def test_training_is_deterministic(tmp_path):
    train = _train_module()
    train.train_all(tmp_path / "a", train.TINY, log=lambda *_: None)
    train.train_all(tmp_path / "b", train.TINY, log=lambda *_: None)
    a, b = train.tree_hashes(tmp_path / "a"), train.tree_hashes(tmp_path / "b")
    assert len(a) >= 9 and a == b
    assert "adapters/review/adapter_model.safetensors" in a


# --- deployments: the same greedy text as PEFT --------------------------------------------------------------

PARITY_ITEMS = 6  # test-split MRs; prompts of different lengths share left-padded batches on our side
THIRD_PARTY_NOISE = ("Loading weights", "it/s]", "Warning", "warnings.warn", "FutureWarning", "UserWarning")


def _lora_export(*args, timeout=600, cwd=ROOT):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):  # conftest quiets these; the CLI must
        env.pop(k, None)
    cmd = [sys.executable, "-m", "lora_export", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """bank (written by the CLI: its output is checked for noise), inputs (API), merged (inputs + bake)."""
    import shutil

    from lora_export import api
    from lora_export.passes import optimize_file

    root = tmp_path_factory.mktemp("e2e")
    specs = e2e.adapter_specs()
    bank = root / "bank"
    proc = _lora_export("export-decoder", "sample:e2e", *sum((["--adapter", s] for s in specs), []),
                        "--layout", "bank", "-o", bank, "--no-verify")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    inputs = root / "inputs"
    api.export_decoder(e2e.SPEC, inputs, adapters=specs, layout="inputs", verify=False)
    merged = root / "merged_description"
    shutil.copytree(inputs, merged, ignore=shutil.ignore_patterns("adapters", "model.onnx*"))
    optimize_file(inputs / "model.onnx", merged / "model.onnx", bake=inputs / "adapters" / "description.onnx_adapter")
    return {"bank": bank, "inputs": inputs, "merged": merged, "cli": proc}


@pytest.fixture(scope="module")
def peft_tokens(base, tokenizer):
    """Greedy PEFT `generate` on each prompt alone, stopping at end-of-text: {adapter or None: [tokens]}."""
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(e2e.adapter_dir("description")), "description")
    model.load_adapter(str(e2e.adapter_dir("review")), "review")
    model.eval()
    prompts = [tokenizer(data.prompt(r.mr))["input_ids"] for r in e2e.records("test")[:PARITY_ITEMS]]
    out = {}
    for name in (None, *e2e.ADAPTERS):
        rows = []
        for p in prompts:
            ids = torch.tensor([p])
            if name is None:
                ctx = model.disable_adapter()
            else:
                model.set_adapter(name)
                ctx = torch.no_grad()
            with ctx, torch.no_grad():
                seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=64, eos_token_id=0, pad_token_id=0)  # fmt: skip
            rows.append(seq[0, len(p) :].tolist())
        out[name] = rows
    return prompts, out


def _ours(folder, prompts, **rows):
    from lora_export.runtime.generator import Generator

    with Generator(folder) as gen:
        return gen.generate(prompts, max_new_tokens=64, stop_token_ids=[0], **rows).tokens


def test_merged_branched_bank_generate_the_same_tokens_as_peft(folders, peft_tokens):
    prompts, ref = peft_tokens
    assert ref["description"] != ref["review"] != ref[None], "the adapters must change the text"
    assert _ours(folders["merged"], prompts) == ref["description"]
    for name in e2e.ADAPTERS:
        assert _ours(folders["inputs"], prompts, adapter=name) == ref[name], name
    assert _ours(folders["inputs"], prompts) == ref[None]
    mix = [(None, *e2e.ADAPTERS)[i % 3] for i in range(len(prompts))]  # one batch, one adapter per row
    want = [ref[name][i] for i, name in enumerate(mix)]
    assert _ours(folders["bank"], prompts, adapters=mix) == want


def test_cli_export_output_has_no_third_party_noise(folders):
    proc = folders["cli"]
    noise = [n for n in THIRD_PARTY_NOISE if n in proc.stdout + proc.stderr]
    assert not noise, proc.stderr
    assert "wrote" in proc.stdout


def test_verbose_shows_third_party_output(tmp_path):
    # export-decoder's generation check loads the weights with transformers (the export itself streams them
    # from the checkpoint, and inspect reads shapes only: no progress bar to hide there)
    quiet = _lora_export("export-decoder", "sample:e2e", "-o", tmp_path / "q")
    loud = _lora_export("--verbose", "export-decoder", "sample:e2e", "-o", tmp_path / "l")
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "Loading weights" not in quiet.stderr + quiet.stdout
    assert "Loading weights" in loud.stderr


def test_one_error_style_and_no_doubled_words(tmp_path):
    import re

    usage = _lora_export("merge-and-export", "sample:gpt2", "--no-such-flag")
    assert usage.returncode == 2 and usage.stderr.startswith("error: no such option"), usage.stderr
    assert len(usage.stderr.strip().splitlines()) == 1 and "Usage:" not in usage.stderr
    adapter = tmp_path / "adapter"  # a folder named like the kind of thing it is
    assert _lora_export("make-adapter", "sample:llama", "-o", adapter).returncode == 0
    wrong = _lora_export("export-branched", "sample:gpt2", "--adapter", "adapter", "-o", "x.onnx", cwd=tmp_path)
    assert wrong.returncode == 2
    assert not re.search(r"\b(\w+) \1\b", wrong.stderr), wrong.stderr
    errors = [line for line in wrong.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: adapter targets"), wrong.stderr


# --- verify --task e2e: task scores of a folder next to PyTorch + PEFT -------------------------------------

TASK_ITEMS = 3


def test_verify_task_bank_folder_matches_peft(folders):
    from lora_export import api

    report = api.verify_task(e2e.SPEC, folders["bank"], check=TaskCheck(split="test", limit=TASK_ITEMS))
    assert report.layout == "bank" and report.mode == "exact" and report.passed, report.to_dict()
    assert [c.adapter for c in report.comparisons] == list(e2e.ADAPTERS)
    assert [c.items for c in report.comparisons] == [[0, 2], [1]]  # one batch, rows alternate the adapters
    for c in report.comparisons:
        assert c.same_text == c.n and c.max_delta == 0.0 and c.first_difference is None
        assert c.reference.bleu > 10, c.to_dict()


def test_verify_task_reports_a_folder_with_the_wrong_adapter(folders, tmp_path):
    """A folder whose `description` adapter file holds the review adapter generates other text than PEFT."""
    import shutil

    from lora_export import api

    wrong = tmp_path / "wrong"
    shutil.copytree(folders["inputs"], wrong)
    shutil.copyfile(wrong / "adapters" / "review.onnx_adapter", wrong / "adapters" / "description.onnx_adapter")
    report = api.verify_task(e2e.SPEC, wrong, check=TaskCheck(limit=TASK_ITEMS), adapters=["sample:e2e/description"])
    (c,) = report.comparisons
    assert not report.passed and c.adapter == "description"
    assert c.same_text < c.n and c.first_difference is not None
    assert c.first_difference["deployment"] != c.first_difference["reference"]
    assert report.to_dict()["comparisons"][0]["passed"] is False


def test_verify_task_cli_exit_codes_and_misuse(folders):
    from tests.cli_helpers import assert_one_line_error, run

    merged = folders["merged"]  # the description adapter baked in: its manifest says so
    bad = run("verify", e2e.SPEC, "--onnx", merged, "--task", "e2e", "--limit", TASK_ITEMS, "--adapter", "review",
              ok=False)  # fmt: skip
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.stdout and "task check failed" in bad.stderr
    assert "review" in bad.stdout and f"0/{TASK_ITEMS} same text" in bad.stdout
    assert_one_line_error(
        run("verify", "sample:gpt2", "--onnx", merged, "--task", "e2e", ok=False), r"give sample:e2e as the model"
    )
    assert_one_line_error(run("verify", e2e.SPEC, "--onnx", merged, "--limit", 3, ok=False), r"--limit needs --task")
    assert_one_line_error(run("verify", e2e.SPEC, "--task", "e2e", ok=False), r"pass --onnx FOLDER")
    assert_one_line_error(
        run("verify", e2e.SPEC, "--onnx", merged, "--task", "e2e", "--adapter", "poem", ok=False),
        r"not an adapter of sample:e2e",
    )


def test_verify_task_tie_is_a_float32_tie_in_peft_logits(base, tokenizer):
    """Test item 156 (description): PEFT's top-2 logits differ by ~2e-6 at the venue name ("near The
    Portland Arms" vs "near The Sorrento"), so either text is a tie; another adapter's text is not."""
    from lora_export.verify.task_check import _is_tie, _peft_model

    model = _peft_model(base, "description")
    prompt = data.prompt(e2e.records("test")[156].mr)
    tie = "Green Man is a place in the riverside area near The Sorrento. It has a customer rating of 3 out of 5. It is not kid friendly."  # noqa: E501
    assert _is_tie(model, tokenizer, prompt, tie, 64)
    assert not _is_tie(model, tokenizer, prompt, "Green Man is a great find. I liked the food.", 64)

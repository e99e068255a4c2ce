"""`export-decoder --fused`: the ONNX Runtime GenAI builder's graph with our LoRA branches, against PEFT.

The oracle is PEFT `generate` (tokens) and the generation check (logits, calibrated tolerance); the runtimes are
ONNX Runtime GenAI with the adapter loaded through `og.Adapters`, as a user would run the folder, and our
`Generator` (right-padded batches: GroupQueryAttention's per-row sequence lengths; bank folders per row).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from decoder_setup import PROMPTS, peft_generate

from lora_export.adapters import read_adapter
from lora_export.errors import UserError
from lora_export.export.decoder import export_decoder
from lora_export.verify.generation import greedy_genai, verify_generation

og = pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnxruntime_genai.models.builder")

NEW = 12


def model_dir(loaded, path):
    """The tiny model as a user has it: a transformers directory with a tokenizer (a word-level one over its
    vocabulary), opened from disk."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lora_export.api import as_model

    module = loaded.materialized().module
    module.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(module.config.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0")
    tok.save_pretrained(path)
    return as_model(str(path), lazy=True)


@pytest.fixture(scope="module")
def fused(decoders, tmp_path_factory):
    """(arch, layout, precision) -> (folder, setup dict), each exported once from the tiny model's directory."""
    root = tmp_path_factory.mktemp("fused")
    made, dirs = {}, {}

    def get(arch: str, layout: str = "inputs", precision: str = "fp32"):
        key = (arch, layout, precision)
        if key not in made:
            m = decoders.model(arch)
            names = ("x",) if layout == "merged" else ("x", "y")  # bank: both, one per row
            adapters = [read_adapter(m["dirs"][n], name=n) for n in names]
            out = root / "_".join(key)
            if arch not in dirs:
                dirs[arch] = model_dir(m["loaded"], root / f"{arch}_hf")
            made[key] = export_decoder(
                dirs[arch], out, adapters=adapters, layout=layout, fused=True, precision=precision
            )
        return made[key], decoders.model(arch)

    return get


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_fused_graph_is_the_builders_with_contract_inputs(fused):
    result, m = fused("llama")
    model = onnx.load(str(result.model_path), load_external_data=False)
    ops = _ops(result.model_path)
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert "Transpose" not in {n.op_type for n in model.graph.node if "/layers." in n.name}
    names = {i.name for i in model.graph.input}
    assert "position_ids" not in names  # GQA takes positions from the mask's sequence lengths
    # the builder packs q/k/v into one MatMul per layer; the branches keep the PEFT modules' contract names
    assert any(n.name.endswith("/attn/qkv_proj/MatMul") for n in model.graph.node)
    adapted = set(read_adapter(m["dirs"]["x"], name="x").modules)
    lora = {n for n in names if ".lora_" in n}
    assert lora == {f"{p}.lora_{ab}.weight" for p in adapted for ab in "AB"}
    assert result.manifest.extra["fused"]["branches"] == len(adapted)  # every adapted module found by node name
    config = (result.path / "genai_config.json").read_text()
    assert '"past_present_share_buffer": true' in config


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_inputs_tokens_equal_peft_under_genai(fused, arch):
    result, m = fused(arch)
    files = dict(result.adapters)
    for adapter in ("x", "y", None):
        ours, _ = greedy_genai(result.path, [PROMPTS[0]], [adapter], files, NEW)
        assert ours[0] == peft_generate(m["pm"], PROMPTS[0], NEW, adapter), (arch, adapter)
    with_x, _ = greedy_genai(result.path, [PROMPTS[0]], ["x"], files, NEW)
    assert with_x[0] != peft_generate(m["pm"], PROMPTS[0], NEW, None)  # the adapter is live


def test_fused_inputs_pass_the_generation_check(fused):
    result, m = fused("llama")
    report = verify_generation(m["loaded"], result.path, new_tokens=8)
    assert report.passed, [c.reason for c in report.cases if not c.passed]
    assert {c.label.split(" 1x")[0].split(" 3x")[0] for c in report.cases} == {"adapter x", "adapter y", "no adapter"}
    assert max(c.max_logits_err for c in report.cases) < 1e-3


def test_fused_merged_folds_the_adapter(fused):
    result, m = fused("qwen2", "merged")  # qwen2: q/k/v biases, q,v,o adapted
    assert not any(".lora_" in i.name for i in onnx.load(str(result.model_path), load_external_data=False).graph.input)
    ours, _ = greedy_genai(result.path, [PROMPTS[1]], [None], {}, NEW)
    assert ours[0] == peft_generate(m["pm"], PROMPTS[1], NEW, "x")


def test_fused_int4_base_under_float_branches(fused):
    result, m = fused("llama", "inputs", "int4")
    graph = onnx.load(str(result.model_path), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = {(a.name, a.i) for n in nbits for a in n.attribute if a.name in ("bits", "block_size", "accuracy_level")}
    assert attrs == {("bits", 4), ("block_size", 32), ("accuracy_level", 4)}
    assert any("lm_head" in n.name for n in nbits)  # lm_head quantized, as the builder does
    lora = [i for i in graph.input if ".lora_" in i.name]
    assert lora and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in lora)
    # tiny random weights prove shapes, not int4 tolerances (test_real_decoder judges int4 on real weights): here
    # the int4 logits follow the fp32 folder's, and the adapter's float branch moves them as it moves fp32's
    fp32, _ = fused("llama")
    files4, files32 = dict(result.adapters), dict(fp32.adapters)
    _, q_x = greedy_genai(result.path, [PROMPTS[0]], ["x"], files4, 1)
    _, q_base = greedy_genai(result.path, [PROMPTS[0]], [None], files4, 1)
    _, f_x = greedy_genai(fp32.path, [PROMPTS[0]], ["x"], files32, 1)
    _, f_base = greedy_genai(fp32.path, [PROMPTS[0]], [None], files32, 1)
    assert _cosine(q_base, f_base) > 0.98
    assert np.abs(q_x - q_base).max() > 0.1 and _cosine(q_x - q_base, f_x - f_base) > 0.9


def _cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_fused_refuses_in_one_line_and_falls_back(decoders, tmp_path):
    m = decoders.model("llama")
    adapters = [read_adapter(m["dirs"][n], name=n) for n in ("x", "y")]
    with pytest.raises(UserError, match="--fused cannot be written: .* not a model directory with a tokenizer") as e:
        export_decoder(m["loaded"], tmp_path / "bank", adapters=adapters, layout="bank", fused=True)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert not (tmp_path / "bank").exists()
    gpt2 = decoders.model("gpt2")
    with pytest.raises(UserError, match="model type 'gpt2' has no fused writer"):
        export_decoder(gpt2["loaded"], tmp_path / "g", layout="merged", fused=True)
    with pytest.raises(UserError, match="--precision int4 is the fused graph's"):
        export_decoder(m["loaded"], tmp_path / "q", layout="merged", precision="int4")
    auto = export_decoder(m["loaded"], tmp_path / "auto", adapters=adapters, layout="bank")  # the default: auto
    assert auto.note.startswith("traced (unfused) graph: sample:llama is not a model directory")
    assert "fused" not in auto.manifest.extra


def _peft_rows(m, prompts, rows, new=NEW):
    return [peft_generate(m["pm"], p, new, a) for p, a in zip(prompts, rows)]


def test_our_generator_runs_fused_folders_right_padded(fused):
    """Rows of different lengths in one batch (right-padded: each row's length goes to GroupQueryAttention as its
    sequence length), with and without IO binding, equal PEFT generate on each prompt alone."""
    from lora_export.runtime import Generator

    result, m = fused("llama")
    for io_binding in (True, False):
        with Generator(result.path, io_binding=io_binding) as gen:
            assert gen.fused and sorted(gen.adapters()) == ["x", "y"]
            for adapter in ("x", "y", None):
                got = gen.generate(PROMPTS, adapter=adapter, max_new_tokens=NEW, ignore_eos=True).tokens
                assert got == _peft_rows(m, PROMPTS, [adapter] * 3), (io_binding, adapter)


def test_fused_rows_join_and_leave_mid_generation(fused):
    """Continuous batching on a fused folder: a row joins after two steps, another leaves after four; every row's
    tokens are PEFT's for its prompt alone. A multi-token step equals prefilling the longer prompt."""
    from lora_export.runtime import Generator

    result, m = fused("llama")
    with Generator(result.path) as gen:
        batch = gen.prefill(PROMPTS[:2], adapter="x", keys=["a", "b"])
        tokens = {"a": [], "b": [], "c": []}

        def advance():
            for key, logits in zip(batch.keys, batch.logits):
                tokens[key].append(int(logits.argmax()))
            gen.step(batch, [tokens[k][-1] for k in batch.keys])

        for _ in range(2):
            advance()
        batch = gen.join(batch, gen.prefill([PROMPTS[2]], adapter="x", keys=["c"]))
        for _ in range(2):
            advance()
        gone = tokens["a"][:4]
        batch = gen.drop(batch, [batch.row_of("a")])
        for _ in range(4):
            advance()
        assert batch.right and batch.past_length <= max(map(len, PROMPTS[1:])) + 8
        assert gone == peft_generate(m["pm"], PROMPTS[0], 4, "x")
        assert tokens["b"] == peft_generate(m["pm"], PROMPTS[1], 8, "x")
        assert tokens["c"] == peft_generate(m["pm"], PROMPTS[2], 6, "x")

        extra = [[5, 6, 7], [8, 9, 10]]
        batch = gen.prefill(PROMPTS[:2], adapter="y")
        several = gen.step(batch, extra)  # two rows: run as one-token steps (GQA takes k tokens for one row only)
        one = gen.prefill([PROMPTS[0]], adapter="y")
        alone = gen.step(one, [extra[0]])  # one row: one run
        for i, p in enumerate(PROMPTS[:2]):
            want = gen.prefill([p + extra[i]], adapter="y").logits[0]
            np.testing.assert_allclose(several[i, -1], want, atol=1e-4)
        np.testing.assert_allclose(alone[0, -1], several[0, -1], atol=1e-4)


def test_fused_sampling_is_per_row_and_reproducible(fused):
    from lora_export.runtime import Generator, SamplingParams

    result, _ = fused("llama")
    with Generator(result.path) as gen:
        params = [
            SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, seed=s, ignore_eos=True) for s in (1, 2, 3)
        ]
        together = gen.generate(PROMPTS, adapter="x", sampling=params).tokens
        alone = [gen.generate(p, adapter="x", sampling=[q]).tokens[0] for p, q in zip(PROMPTS, params)]
        streamed = [[] for _ in PROMPTS]
        for event in gen.stream(PROMPTS, adapter="x", sampling=params):
            streamed[event.row].append(event.token)
    assert together == alone == streamed
    assert len({tuple(t) for t in together}) == 3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_bank_mixes_adapters_per_row(fused, arch):
    """A fused bank folder: `adapter_index` + the contract's banks, each row's A and B gathered; rows with x, none
    and y in one batch equal PEFT per row, and the export's check (our generator, a bank batch) passes."""
    from lora_export.runtime import Generator

    result, m = fused(arch, "bank")
    graph = onnx.load(str(result.model_path), load_external_data=False).graph
    names = {i.name for i in graph.input}
    adapted = set(read_adapter(m["dirs"]["x"], name="x").modules)
    assert "adapter_index" in names
    assert {n for n in names if ".lora_" in n} == {f"{p}.lora_{ab}.bank" for p in adapted for ab in "AB"}
    assert sum(n.op_type == "Gather" and "/lora/" in n.name for n in graph.node) == 2 * len(adapted)
    assert result.manifest.extra["bank_formulation"] == "gather"
    rows = ["x", None, "y"]
    with Generator(result.path) as gen:
        assert gen.layout == "bank" and gen.fused
        got = gen.generate(PROMPTS, adapters=rows, max_new_tokens=NEW, ignore_eos=True).tokens
        none = gen.generate(PROMPTS[:2], adapters=[None, None], max_new_tokens=4, ignore_eos=True).tokens
    assert got == _peft_rows(m, PROMPTS, rows)
    assert none == _peft_rows(m, PROMPTS[:2], [None, None], 4)  # no adapter in the batch: an empty bank
    report = verify_generation(m["loaded"], result.path, new_tokens=6)
    assert report.passed, [c.reason for c in report.cases if not c.passed]

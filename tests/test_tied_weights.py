"""LoRA on an `lm_head` tied to the input embeddings: every merge gives `lm_head` its own weight.

PEFT's unmerged forward (the oracle) applies the adapter to `lm_head` only; the embeddings keep `W0`. Merged
export, `optimize --bake` and the TensorRT refit plan must agree with it, and leave the embedding table bit
for bit as it was.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from peft_oracle import build_peft, max_err, peft_forward

TOL = 1e-4
ATTENTION = {"gpt2": ["c_attn"], "llama-tied": ["q_proj", "v_proj"]}
EMBEDDINGS = {"gpt2": "transformer.wte.weight", "llama-tied": "model.embed_tokens.weight"}


def tied_llama():
    import torch
    import transformers

    from lora_export.models.loading import wrap_transformers
    from lora_export.models.zoo import SAMPLES

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SAMPLES["llama"].config, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return wrap_transformers(model, "tied-llama")


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _run(path, feeds, extra=None):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**feeds, **(extra or {})})))


@pytest.fixture(scope="module", params=["gpt2", "llama-tied"])
def tied(request, sample_cache, export_cache, tmp_path_factory):
    """A tied model, PEFT models for lm_head alone ("head") and lm_head + attention ("both"), their adapter
    directories, merged exports of each, a branched export with slots for both, and a graph holding the base
    weights for the refit plan (gpt2: a branched export without an lm_head slot, where lm_head is still tied)."""
    from lora_export.adapters.peft_io import read_adapter
    from lora_export.export.branched import export_branched
    from lora_export.export.merged import export_merged
    from lora_export.verify.check import make_feeds

    name = request.param
    loaded = sample_cache("gpt2") if name == "gpt2" else tied_llama()
    root = tmp_path_factory.mktemp(f"tied_{name}")
    peft, adapters, merged = {}, {}, {}
    for key, targets in (("head", ["lm_head"]), ("both", ["lm_head", *ATTENTION[name]])):
        pm = build_peft(loaded, seed=3, r=4, lora_alpha=8, target_modules=targets)
        pm.save_pretrained(str(root / key), save_embedding_layers=False)
        peft[key], adapters[key] = pm, read_adapter(root / key)
        merged[key] = export_merged(loaded, adapters[key], root / f"merged_{key}.onnx").path
    branched = export_branched(loaded, root / "branched.onnx", adapters=[adapters["both"]]).path
    base = export_cache("gpt2") if name == "gpt2" else branched
    feeds = make_feeds(loaded, 2, 9, 0)
    return dict(
        name=name,
        loaded=loaded,
        peft=peft,
        adapters=adapters,
        merged=merged,
        base=base,
        branched=branched,
        feeds=feeds,
        root=root,
    )


def test_merged_export_matches_peft_and_keeps_embeddings(tied):
    """lm_head alone, and lm_head + attention, on both tied models."""
    loaded, feeds = tied["loaded"], tied["feeds"]
    embeddings = loaded.module.get_input_embeddings().weight.detach().numpy()
    assert sorted(tied["merged"]) == ["both", "head"]
    for key, graph in tied["merged"].items():
        want = peft_forward(tied["peft"][key], loaded, feeds)
        assert max_err(want, _run(graph, feeds)) <= TOL, key
        inits = _initializers(graph)
        assert np.array_equal(inits[EMBEDDINGS[tied["name"]]], embeddings), key  # bit for bit
        assert not np.array_equal(inits["lm_head.weight"], embeddings), key  # lm_head got its own, merged weight


@pytest.mark.parametrize("key", ["head", "both"])
def test_merged_export_verifies_against_peft(tied, key):
    from lora_export.verify.check import verify_graph

    report = verify_graph(tied["loaded"], tied["merged"][key], [tied["adapters"][key]], shapes=[(2, 9)])
    assert report.passed, report.to_dict()["summary"]
    assert report.reference.startswith("torch+peft")


def test_merging_writes_a_new_weight_and_leaves_the_tie_alone(tied):
    from lora_export.adapters.inject import merge_adapter
    from lora_export.adapters.ties import tied_groups

    work = tied["loaded"].copy()
    emb = work.module.get_input_embeddings().weight.detach().clone()
    assert tied_groups(work.module)  # the input embeddings and lm_head share one tensor
    merge_adapter(work.module, tied["adapters"]["head"])
    assert not tied_groups(work.module)
    assert torch_equal(work.module.get_input_embeddings().weight, emb)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach(), b))


@pytest.mark.parametrize("key", ["head", "both"])
def test_bake_matches_peft_and_merge_and_export(tied, key):
    from lora_export.passes.pipeline import optimize_file

    out = tied["root"] / f"baked_{key}.onnx"
    optimize_file(tied["branched"], out, bake=tied["adapters"][key], force=True)
    want = peft_forward(tied["peft"][key], tied["loaded"], tied["feeds"])
    assert max_err(want, _run(out, tied["feeds"])) <= TOL
    baked = _initializers(out)
    embeddings = tied["loaded"].module.get_input_embeddings().weight.detach().numpy()
    assert np.array_equal(baked[EMBEDDINGS[tied["name"]]], embeddings)
    merged = _initializers(tied["merged"][key])
    for name in (EMBEDDINGS[tied["name"]], "lm_head.weight"):
        assert np.array_equal(baked[name], merged[name]), name  # bake == merge-and-export, bit for bit


@pytest.mark.parametrize("key", ["head", "both"])
def test_refit_plan_weights_match_peft(tied, key):
    """An engine built from a merged export (lm_head untied there), refit to another adapter: the plan's
    weights put into that graph give PEFT's forward; the embeddings are never in the plan."""
    from lora_export.engines.refit_plan import GraphWeights, merged_refit_plan

    engine_graph = onnx.load(str(tied["merged"]["both"]))
    base = GraphWeights(onnx.load(str(tied["base"])))
    engine = GraphWeights(engine_graph)
    previous = [f"{p}.weight" for p in tied["adapters"]["both"].modules]  # what the engine manifest tracks
    plan = merged_refit_plan(base, tied["adapters"][key], previous, engine=engine)
    assert EMBEDDINGS[tied["name"]] not in plan.values and "lm_head.weight" in plan.values
    for t in engine_graph.graph.initializer:
        if t.name in plan.values:
            t.CopyFrom(numpy_helper.from_array(plan.values[t.name], t.name))
    path = tied["root"] / f"refit_{key}.onnx"
    onnx.save(engine_graph, str(path))
    want = peft_forward(tied["peft"][key], tied["loaded"], tied["feeds"])
    assert max_err(want, _run(path, tied["feeds"])) <= TOL


def test_refit_plan_refuses_an_engine_whose_lm_head_is_tied(export_cache, sample_cache):
    from conftest import make_random_adapter

    from lora_export.engines.refit_plan import GraphWeights, merged_refit_plan
    from lora_export.errors import UserError

    base = GraphWeights(onnx.load(str(export_cache("gpt2"))))  # lm_head and wte: one tensor in this graph
    adapter = make_random_adapter(sample_cache("gpt2"), targets=["lm_head"], r=2)
    with pytest.raises(UserError, match=r"cannot refit lm_head: .* reads its weight lm_head\.weight in Gather"):
        merged_refit_plan(base, adapter, [], engine=base)

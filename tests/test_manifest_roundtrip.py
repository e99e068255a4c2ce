"""The graph manifest (`contract.GraphManifest`) stays true through every command that rewrites a graph.

For each layout (merged, inputs, bank) the exported manifest is carried through `optimize` (default,
`--fp16`, `--bake`) and the TensorRT graph rewrite (`engines.graph.prepare_graph`); after each, the I/O, the
LoRA inputs, the layout and the slots must describe the graph that was written. A bank graph's adapter index
once fell out of the optimized manifest's inputs.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from conftest import make_random_adapter

from lora_export.artifacts.onnxio import read_manifest, slots_of_ir
from lora_export.cli import cli
from lora_export.contract import ADAPTER_INDEX, BANK, INPUTS, GraphManifest, is_lora_tensor
from lora_export.engines.graph import prepare_graph
from lora_export.errors import UserError
from lora_export.passes.pipeline import optimize_file

LAYOUTS = ("merged", INPUTS, BANK)


@pytest.fixture(scope="module")
def sources(export_cache, sample_cache, tmp_path_factory):
    """One exported graph per layout (the branched ones shared with the other tests of the session)."""
    from lora_export.export.merged import export_merged

    merged = export_merged(sample_cache("gpt2"), None, tmp_path_factory.mktemp("rt") / "merged.onnx").path
    return {"merged": merged, INPUTS: export_cache("gpt2"), BANK: export_cache("gpt2", BANK)}


def names(entries: list[dict]) -> list[str]:
    return [e["name"] for e in entries]


def assert_describes(manifest: GraphManifest, path) -> None:
    """`manifest` says what the graph at `path` is: I/O split by the contract, slots read from the graph."""
    model = ir.load(path)
    graph_inputs = [v.name for v in model.graph.inputs]
    assert names(manifest.inputs) == [n for n in graph_inputs if not is_lora_tensor(n)]
    assert names(manifest.lora_inputs) == [n for n in graph_inputs if is_lora_tensor(n)]
    assert names(manifest.outputs) == [v.name for v in model.graph.outputs]
    expected = GraphManifest(kind=manifest.kind)
    expected.set_slots(slots_of_ir(model))
    assert (manifest.layout, manifest.lora_modules, manifest.max_rank, manifest.no_adapter_index) == (
        expected.layout,
        expected.lora_modules,
        expected.max_rank,
        expected.no_adapter_index,
    )
    assert GraphManifest.from_dict(manifest.to_dict()) == manifest  # the JSON form holds everything


def same_slots(a: GraphManifest, b: GraphManifest) -> None:
    assert (a.layout, a.lora_modules, a.max_rank, a.no_adapter_index) == (
        b.layout,
        b.lora_modules,
        b.max_rank,
        b.no_adapter_index,
    )
    assert names(a.inputs) == names(b.inputs) and names(a.lora_inputs) == names(b.lora_inputs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_manifest_describes_its_graph(sources, layout):
    manifest = read_manifest(sources[layout])
    assert_describes(manifest, sources[layout])
    assert manifest.layout == (None if layout == "merged" else layout)
    assert (ADAPTER_INDEX in names(manifest.inputs)) == (layout == BANK)
    if layout != "merged":
        assert manifest.lora_modules and manifest.lora_inputs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fp16", [False, True], ids=["default", "fp16"])
def test_optimize_keeps_the_manifest_true(sources, layout, fp16, tmp_path):
    src = sources[layout]
    out = tmp_path / "opt.onnx"
    optimize_file(src, out, fp16=fp16)
    before, after = read_manifest(src), read_manifest(out)
    assert_describes(after, out)
    same_slots(after, before)  # optimizing changes neither the I/O names nor the slots
    assert after.kind == before.kind and after.dtype == ("fp16" if fp16 else before.dtype)
    assert after.optimized["options"]["fp16"] is fp16
    if layout == BANK:
        assert ADAPTER_INDEX in names(after.inputs) and ADAPTER_INDEX not in names(after.lora_inputs)


def test_optimize_through_the_cli_keeps_a_bank_index(sources, tmp_path):
    out = tmp_path / "bank.opt.onnx"
    result = CliRunner().invoke(cli, ["optimize", str(sources[BANK]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert ADAPTER_INDEX in names(read_manifest(out).inputs)
    same_slots(read_manifest(out), read_manifest(sources[BANK]))


def test_bake_makes_a_merged_manifest_and_refuses_other_layouts(sources, sample_cache, tmp_path):
    adapter = make_random_adapter(sample_cache("gpt2"), r=4, seed=5, name="baked")
    out = tmp_path / "baked.onnx"
    optimize_file(sources[INPUTS], out, bake=adapter)
    manifest = read_manifest(out)
    assert_describes(manifest, out)
    assert manifest.kind == "merged" and manifest.layout is None and manifest.lora_inputs == []
    assert manifest.lora_modules == [] and manifest.max_rank is None
    assert manifest.adapters[-1]["name"] == "baked"
    for layout in ("merged", BANK):
        refused = tmp_path / f"{layout}.baked.onnx"
        with pytest.raises(UserError):
            optimize_file(sources[layout], refused, bake=adapter)
        assert not refused.exists() and read_manifest(refused) is None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_engine_graph_rewrite_follows_the_manifest(sources, layout):
    manifest = read_manifest(sources[layout])
    prepared = prepare_graph(onnx.load(str(sources[layout])), manifest, lora_as="inputs")
    assert prepared.kind == manifest.kind and prepared.lora_modules == manifest.lora_modules
    # TensorRT sees the model inputs (a bank's index included) and, with their defaults dropped, the LoRA inputs
    assert [i["name"] for i in prepared.inputs] == names(manifest.inputs) + names(manifest.lora_inputs)
    # the JSON form of the manifest reads the same
    again = prepare_graph(onnx.load(str(sources[layout])), manifest.to_dict(), lora_as="inputs")
    assert again.inputs == prepared.inputs and again.lora_modules == prepared.lora_modules
    if layout == INPUTS:
        weights = prepare_graph(onnx.load(str(sources[layout])), manifest, lora_as="weights", lora_rank=4)
        assert [i["name"] for i in weights.inputs] == names(manifest.inputs)
        assert weights.lora_modules == manifest.lora_modules and weights.lora_rank == 4

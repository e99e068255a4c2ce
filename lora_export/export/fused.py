"""`export-decoder --fused`: the ONNX Runtime GenAI model builder's fused graph, with our LoRA side branches.

The base graph is the builder's own (`python -m onnxruntime_genai.models.builder`, run as a subprocess on the
model's transformers directory): GroupQueryAttention with rotary inside, packed q/k/v MatMuls,
(Skip)SimplifiedLayerNormalization, the attention mask as `seqlens_k` / `total_sequence_length`, the KV cache in
place (`past_present_share_buffer`), `MatMulNBits` at int4 / int8. So the base costs what the builder's costs, by
construction, and builds as fast as it does (no torch trace). We then wire the LoRA branches in with onnx-ir:

- every adapted projection gets the contract's A `[in, r_k]` and B `[r_k, out]` inputs (`contract.weight_names`;
  scaling folded into B, rank-0 defaults: no adapter = the base model), so PEFT directories and
  `.onnx_adapter` files work unchanged, through `og.Adapters` or our packer;
- a plain projection adds `(x·A)·B` to its MatMul output;
- a packed one (the builder's `qkv_proj`, `gate_up_proj`) adds the concatenation of its members' `(x·A_i)·B_i`
  (a member without a slot gets a rank-0 constant branch: exact zeros for its slice). Measured against A
  concatenated along r with a block B built from padded B's: that rebuilds the A and B blocks every step, and
  its Concat/Pad copies cost more than the extra small MatMuls (SmolLM2-135M int4, r=16 all-linear, one decode
  step at 200 past tokens, ONNX Runtime, 1 thread: the adapter added 25% to a step as blocks, 11% as deltas).

Layouts: `merged` (the adapter folded into the weights first, then the builder), `inputs`, and `bank`: per-row
adapters by the adapter index input, in the gather formulation (each row's A `[in, R]` and B `[R, out]` gathered
from the `[N, in, R]` / `[N, R, out]` banks, a batched MatMul, rows at -1 masked to zero), so a row's LoRA cost
does not grow with the number of adapters in the batch. A bank folder is run by our `Generator` (GenAI feeds no
adapter index). DoRA, `modules_to_save`, embeddings, and architectures the builder does not write fall back to
the traced graph (`export.decoder`) with one line saying why (`fused_refusal`). The builder's node names are what
we find the projections by: `onnxruntime-genai` is pinned (pyproject `fused` extra) and a test fails when they move.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_export.adapters.adapter import Adapter
from lora_export.artifacts.decoder_folder import (
    CONFIG_NAME,
    DECODER_KEY,
    FUSED_KEY,
    MODEL_NAME,
    DecoderFacts,
    genai_config,
)
from lora_export.artifacts.fileio import atomic_dir, read_json, write_json
from lora_export.artifacts.onnxio import slots_of_ir, write_manifest
from lora_export.contract import (
    ADAPTER_INDEX,
    BANK,
    GATHER,
    MERGED,
    NUM_ADAPTERS_DIM,
    bank_names,
    decoder_kind,
    rank_dim,
    weight_names,
)
from lora_export.errors import UserError
from lora_export.export.branched import BANK_FORMULATION_KEY, bank_rank
from lora_export.export.decoder_result import WRITTEN, DecoderExport, copy_tokenizer, pack_folder_adapters
from lora_export.models.loading import LoadedModel

FUSED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # model_type values the builder writes as GQA decoders
PRECISIONS = ("fp32", "int4", "int8")
INT4_OPTIONS = ("int4_block_size=32", "int4_accuracy_level=4")  # as the builder's own int4 CPU recipe
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_LAYER_MATMUL = re.compile(r"^/model/layers\.(?P<i>\d+)/(?P<block>attn|mlp)/(?P<proj>\w+)/MatMul(?:_Q\d+|NBits)?$")
_HEAD_MATMUL = re.compile(r"^/lm_head/MatMul(?:_Q\d+|NBits)?$")
_HF_BLOCK = {"attn": "self_attn", "mlp": "mlp"}


@dataclass
class Member:
    """One transformers module inside a builder MatMul: its path and its slice of the MatMul's output."""

    path: str
    in_features: int
    offset: int
    size: int


def fused_refusal(loaded: LoadedModel, adapters: list[Adapter], layout: str) -> str | None:
    """Why the fused graph cannot be written for this request (None: it can)."""
    config = getattr(loaded.module, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_ARCHS:
        return f"model type {model_type!r} has no fused writer here (fused: {', '.join(FUSED_ARCHS)})"
    try:
        import onnxruntime_genai.models.builder  # noqa: F401
    except ImportError:
        return "the ONNX Runtime GenAI model builder is not installed (pip install 'lora-export[fused]')"
    own = Path(str(loaded.extra.get("model_dir", loaded.source)))
    if not ((own / "tokenizer.json").is_file() or (own / "tokenizer_config.json").is_file()):
        return f"{loaded.source} is not a model directory with a tokenizer, which the GenAI builder needs"
    linear = set(_linear_modules(loaded)) if layout != MERGED else set()
    for a in adapters:
        if a.is_dora:
            return f"adapter {a.name} uses DoRA, whose magnitude the fused graph does not take"
        if a.saved or a.base_layers:
            return f"adapter {a.name} replaces whole modules (modules_to_save), which the fused graph does not take"
        if layout != MERGED:
            odd = sorted(p for p in a.modules if p not in linear)
            if odd:
                return f"adapter {a.name} adapts {odd[0]}, which is not a projection of the fused graph"
    return None


def _linear_modules(loaded: LoadedModel) -> dict[str, tuple[int, int]]:
    """Every `nn.Linear` of the transformers model: path -> (in, out)."""
    import torch.nn as nn

    return {
        name: (m.in_features, m.out_features)
        for name, m in loaded.module.named_modules()
        if isinstance(m, nn.Linear) and name
    }


def export_fused_decoder(
    loaded: LoadedModel,
    out: str | Path,
    facts: DecoderFacts,
    *,
    adapters: list[Adapter] = (),
    layout: str = MERGED,
    targets: list[str] | str | None = None,
    precision: str = "fp32",
    max_rank: int | None = None,
    force: bool = False,
) -> DecoderExport:
    """Write the fused decoder folder `out` (see the module docstring); returns a `DecoderExport`. `max_rank`:
    the bank's R (default: the adapters' highest rank, at least 16)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} for the fused decoder: choose {', '.join(PRECISIONS)}")
    out = Path(out)
    adapters = list(adapters)
    linear = _linear_modules(loaded)
    slots = _slot_paths(linear, adapters, targets) if layout != MERGED else []
    rank = bank_rank(adapters, max_rank) if layout == BANK else None
    packed: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix=".fused.", dir=_parent(out)) as work:
        work = Path(work)
        merge = adapters[0] if layout == MERGED and adapters else None
        fold = merge if merge is not None and precision == "fp32" and "lm_head" not in merge.modules else None
        # fp32: the builder writes the base, the adapter is folded into its float weights (no merged model on
        # disk first); int4/int8 quantize the merged weights, and a tied lm_head shares the embedding: saved first
        source = _model_dir(loaded, merge if fold is None else None, work / "hf")
        built = work / "built"
        run_builder(source, built, precision, work / "cache")
        with atomic_dir(out, replaceable=WRITTEN if force else ()) as tmp:
            for f in built.iterdir():
                if f.name not in (MODEL_NAME, f"{MODEL_NAME}.data"):
                    shutil.copyfile(f, tmp / f.name)
            # the builder writes tokenizer.json; the rest as our traced folders
            copy_tokenizer(loaded.extra.get("model_dir", loaded.source), tmp, keep_existing=True)
            model, branches = _wire(built / MODEL_NAME, linear, slots, rank)
            if fold is not None:
                _fold(model, linear, fold)
            import onnx_ir as ir

            ir.save(model, tmp / MODEL_NAME, external_data=f"{MODEL_NAME}.data")
            table = slots_of_ir(model) if layout != MERGED else None
            manifest = _manifest(loaded, model, adapters, layout, table, facts, precision, branches)
            write_manifest(tmp / MODEL_NAME, manifest)
            _special_ids(tmp / CONFIG_NAME, facts)
            if table is not None:
                packed = pack_folder_adapters(table, adapters, tmp, out)
    return DecoderExport(out, manifest, facts, packed)


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _slot_paths(linear: dict[str, tuple[int, int]], adapters: list[Adapter], targets) -> list[str]:
    """The modules that get LoRA inputs: the adapters' modules, else those `targets` names (PEFT's rules)."""
    paths = {p for a in adapters for p in a.modules}
    if not adapters:
        if not targets:
            raise UserError("layout inputs without --adapter needs --targets: the modules to give LoRA slots")
        if isinstance(targets, str):
            rx = re.compile(targets)
            paths = {p for p in linear if rx.fullmatch(p)}
        else:
            paths = {p for p in linear if any(p == t or p.endswith("." + t) for t in targets)}
        if not paths:
            raise UserError(f"--targets {targets} matches no linear module of the model: name q_proj, v_proj, ...")
    return sorted(paths)


def _model_dir(loaded: LoadedModel, merge: Adapter | None, scratch: Path) -> Path:
    """A transformers directory the builder reads: the model's own when it is one on disk and nothing is merged,
    else the model (with `merge` folded into its weights) saved to `scratch`."""
    own = Path(str(loaded.extra.get("model_dir", loaded.source)))
    if merge is None and (own / "config.json").is_file() and any(own.glob("*.safetensors")):
        return own
    module = loaded.materialized().module
    state = None
    if merge is not None:  # a new state dict: the caller's weights are never changed
        state = dict(module.state_dict())
        for path, lora in merge.modules.items():
            key = f"{path}.weight"
            if key not in state:
                raise UserError(f"adapter {merge.name} adapts {path}, which the model does not have")
            state[key] = lora.merged_with(state[key], where=path).contiguous()
    module.save_pretrained(scratch, state_dict=state, safe_serialization=True)
    copy_tokenizer(own, scratch)
    return scratch


def run_builder(source: Path, built: Path, precision: str, cache: Path) -> None:
    """`python -m onnxruntime_genai.models.builder` on a transformers directory (CPU; int4 as its CPU recipe)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(built)]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(cache)]
    if precision == "int4":
        cmd += ["--extra_options", *INT4_OPTIONS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (built / MODEL_NAME).is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise UserError(
            f"the ONNX Runtime GenAI model builder failed on {source}: {lines[-1] if lines else 'no output'}"
            " (export with --unfused to trace the model instead)"
        )


def _members(node_name: str, linear: dict[str, tuple[int, int]]) -> list[Member] | None:
    """The transformers modules a builder MatMul computes (None: not a projection we know)."""
    if _HEAD_MATMUL.match(node_name):
        names = ["lm_head"]
    else:
        m = _LAYER_MATMUL.match(node_name)
        if m is None:
            return None
        prefix = f"model.layers.{m['i']}.{_HF_BLOCK[m['block']]}."
        proj = m["proj"]
        if prefix + proj in linear:  # the model has the packed module itself (Phi-3's qkv_proj)
            names = [prefix + proj]
        elif proj in _PACKED:
            names = [prefix + p for p in _PACKED[proj]]
        else:
            names = [prefix + proj]
    if any(n not in linear for n in names):
        return None
    members, offset = [], 0
    for n in names:
        fan_in, fan_out = linear[n]
        members.append(Member(n, fan_in, offset, fan_out))
        offset += fan_out
    return members


def _wire(graph_path: Path, linear: dict[str, tuple[int, int]], slots: list[str], rank: int | None = None):
    """The builder's graph with a LoRA branch on every projection that has a member in `slots` (bank inputs of
    R = `rank` when it is given, else the inputs layout's)."""
    import onnx_ir as ir

    model = ir.load(graph_path)
    graph = model.graph
    rows = _row_selector(graph) if rank is not None and slots else None
    wanted, found, k = set(slots), set(), 0
    for node in list(graph):
        if node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        members = _members(node.name or "", linear)
        if not members:
            continue
        adapted = [m for m in members if m.path in wanted]
        if not adapted:
            continue
        a_vals, b_vals = [], []
        for m in adapted:
            if rows is None:
                a_name, b_name = weight_names(m.path)
                a_vals.append(_lora_input(graph, a_name, [m.in_features, rank_dim(k)], (m.in_features, 0)))
                b_vals.append(_lora_input(graph, b_name, [rank_dim(k), m.size], (0, m.size)))
            else:
                a_name, b_name = bank_names(m.path)
                a_shape, b_shape = (m.in_features, rank), (rank, m.size)
                a_vals.append(_lora_input(graph, a_name, [NUM_ADAPTERS_DIM, *a_shape], (0, *a_shape)))
                b_vals.append(_lora_input(graph, b_name, [NUM_ADAPTERS_DIM, *b_shape], (0, *b_shape)))
            found.add(m.path)
            k += 1
        _branch(graph, node, members, adapted, a_vals, b_vals, rows)
    missing = sorted(wanted - found)
    if missing:
        raise UserError(
            f"the builder's graph has no projection for {missing[0]} (onnxruntime-genai moved its node names?): "
            "export with --unfused"
        )
    return model, k


def _fold(model, linear: dict[str, tuple[int, int]], adapter: Adapter) -> None:
    """`W += (s·B·A)ᵀ` in the builder's float `[in, out]` MatMul weights, each member in its slice."""
    import onnx_ir as ir

    done = set()
    for node in model.graph:
        members = _members(node.name or "", linear) if node.op_type == "MatMul" else None
        todo = [m for m in members or [] if m.path in adapter.modules]
        if not todo:
            continue
        weight = node.inputs[1]
        w = np.array(weight.const_value.numpy(), dtype=np.float32, copy=True)
        for m in todo:
            w[:, m.offset : m.offset + m.size] += adapter.modules[m.path].delta_weight().numpy().T
            done.add(m.path)
        weight.const_value = ir.tensor(w, name=weight.name)
    missing = sorted(set(adapter.modules) - done)
    if missing:
        raise UserError(f"the builder's graph has no float projection for {missing[0]}: export with --unfused")


def _node_maker(prefix: str, made: list):
    """`op(op_type, inputs, name, **attrs)` -> the output of a new one-output node `prefix/name`, appended to
    `made` (inserted into the graph by the caller, in order)."""
    import onnx_ir as ir

    def op(op_type, inputs, name, **attrs):
        n = ir.node(op_type, inputs, attributes=attrs or None, name=f"{prefix}/{name}", num_outputs=1)
        n.outputs[0].name = f"{prefix}/{name}/output_0"
        made.append(n)
        return n.outputs[0]

    return op


def _row_selector(graph):
    """The bank's per-row selection, made once: the adapter index `[batch]` as a gather index (-1 -> 0) and a row
    mask `[batch, 1, 1]` (0 for rows at -1, so they get no branch). The runtime feeds at least one bank entry."""
    import onnx_ir as ir

    index = ir.Value(name=ADAPTER_INDEX, shape=ir.Shape(["batch_size"]), type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(index)
    made = []
    op = _node_maker("/lora", made)
    zero = op("Constant", [], "zero", value=ir.tensor(np.array(0, dtype=np.int64)))
    gather_index = op("Max", [index, zero], "GatherIndex")
    live = op("Cast", [op("GreaterOrEqual", [index, zero], "Live")], "LiveFloat", to=ir.DataType.FLOAT)
    shape = op("Constant", [], "RowShape", value=ir.tensor(np.array([-1, 1, 1], dtype=np.int64)))
    row_mask = op("Reshape", [live, shape], "RowMask")
    graph.insert_before(graph[0], made)
    return gather_index, row_mask


def _lora_input(graph, name: str, dims: list, default_shape: tuple[int, ...]):
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.FLOAT))
    value.const_value = ir.tensor(np.zeros(default_shape, dtype=np.float32), name=name)
    graph.inputs.append(value)
    graph.register_initializer(value)
    return value


def _branch(graph, node, members: list[Member], adapted: list[Member], a_vals, b_vals, rows=None) -> None:
    """y = MatMul(x, W) becomes y + (x·A)·B; a packed MatMul adds the concatenation of its members' (x·A_i)·B_i.
    Bank (`rows` = the row selector): each row's A and B gathered from the banks, its branch masked when at -1."""
    x, y = node.inputs[0], node.outputs[0]
    base = f"{node.name}/lora"
    made = []
    op = _node_maker(base, made)

    by_path = {m.path: (a, b) for m, a, b in zip(adapted, a_vals, b_vals)}
    deltas = []
    for m in members:
        if m.path in by_path:
            a, b = by_path[m.path]
        else:  # a member without a slot: a rank-0 branch, exact zeros for its slice
            a = _constant(op, np.zeros((m.in_features, 0), np.float32), f"{m.path.rsplit('.', 1)[-1]}/zeroA")
            b = _constant(op, np.zeros((0, m.size), np.float32), f"{m.path.rsplit('.', 1)[-1]}/zeroB")
        tag = "" if len(members) == 1 else f"{m.path.rsplit('.', 1)[-1]}/"
        if rows is not None and m.path in by_path:
            gather_index, row_mask = rows
            a = op("Gather", [a, gather_index], f"{tag}GatherA", axis=0)  # (batch, in, R)
            b = op("Gather", [b, gather_index], f"{tag}GatherB", axis=0)  # (batch, R, out)
            h = op("Mul", [op("MatMul", [x, a], f"{tag}MatMulA"), row_mask], f"{tag}RowMask")
            deltas.append(op("MatMul", [h, b], f"{tag}MatMulB"))
            continue
        deltas.append(op("MatMul", [op("MatMul", [x, a], f"{tag}MatMulA"), b], f"{tag}MatMulB"))
    delta = deltas[0] if len(deltas) == 1 else op("Concat", deltas, "ConcatDelta", axis=-1)
    uses = list(y.uses())
    added = op("Add", [y, delta], "Add")
    added.shape, added.type = y.shape, y.type
    for user, index in uses:
        user.replace_input_with(index, added)
    outputs = list(graph.outputs)
    if y in outputs:  # the lm_head's MatMul writes `logits` itself: the sum takes the name
        name = y.name
        y.name = f"{base}/base_output"
        added.name = name
        graph.outputs[outputs.index(y)] = added
    graph.insert_after(node, made)


def _constant(op, array: np.ndarray, name: str):
    import onnx_ir as ir

    return op("Constant", [], name, value=ir.tensor(array))


def _manifest(loaded, model, adapters, layout, table, facts: DecoderFacts, precision: str, branches: int):
    import importlib.metadata as md

    from lora_export.artifacts.onnxio import graph_io
    from lora_export.contract import GraphManifest
    from lora_export.export.manifest import adapter_entry, versions

    manifest = GraphManifest(
        kind=decoder_kind(layout),
        model={"source": loaded.source, "arch": loaded.arch},
        adapters=[adapter_entry(a) for a in adapters],
        opset=model.opset_imports.get("", None),
        dtype="fp32",
        versions={**versions(), "onnxruntime_genai": md.version("onnxruntime-genai")},
    )
    manifest.set_io(*graph_io(model))
    if table is not None:
        manifest.set_slots(table)
    manifest.extra[DECODER_KEY] = facts.to_dict()
    builder = md.version("onnxruntime-genai")
    manifest.extra[FUSED_KEY] = {"builder": builder, "precision": precision, "branches": branches}
    if layout == BANK:
        manifest.extra[BANK_FORMULATION_KEY] = GATHER
    if precision != "fp32":
        scheme = {"int4": "int4", "int8": "int8-block"}[precision]  # the builder's MatMulNBits, 4 or 8 bits
        manifest.quantization = {"scheme": scheme, "by": "onnxruntime_genai.models.builder"}
        if precision == "int4":
            manifest.quantization["block_size"] = 32
    return manifest


def _special_ids(path: Path, facts: DecoderFacts) -> None:
    """bos / eos / pad in the builder's genai_config.json by the rules of our traced folders (ids inside the
    vocabulary: GenAI refuses a config whose eos is not a token, as some configs name)."""
    config, ours = read_json(path), genai_config(facts)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config["model"][key] = ours["model"][key]
    write_json(path, config)

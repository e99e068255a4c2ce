"""`OrtFusionPass`: ONNX Runtime's transformer fusions (attention, LayerNorm, GELU), only if LoRA slots survive."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import onnx_ir as ir

from lora_export.passes.contract import ContractError, LoraPass, base_weights, check_preserved, count_ops, snapshot

# our arch name -> onnxruntime.transformers.optimizer model_type
MODEL_TYPES = {"gpt2": "gpt2", "bert": "bert", "roberta": "bert", "llama": "bert", "mistral": "bert", "qwen2": "bert"}


def guess_arch(model: ir.Model) -> str:
    names = " ".join(model.graph.initializers)
    if "transformer.h." in names:
        return "gpt2"
    if "encoder.layer." in names:
        return "bert"
    if "model.layers." in names:
        return "llama"
    return "unknown"


class OrtFusionPass(LoraPass, ir.passes.FunctionalPass):
    """Rewrite rules: those of `onnxruntime.transformers.optimizer.optimize_model` for the model type
    (`gpt2` or `bert` fusions: Attention, SkipLayerNormalization, SimplifiedLayerNormalization, FastGelu,
    BiasGelu, ...), run with `opt_level=0` so no ONNX Runtime session-level folding happens here. If the
    architecture's own fusions fail (ORT's gpt2 post-processing wants a Gemm bias our graphs do not have), the
    generic `bert` fusions (LayerNorm, GELU) are tried instead. The result uses `com.microsoft` ops: ONNX
    Runtime only, not TensorRT.

    ORT's constant folding stores `Transpose(W)` into `W` under the same name; that breaks TensorRT refit by
    name, so such weights get their original values back behind an explicit `Transpose` node (ORT folds it
    at session start anyway).

    Then the LoRA contract is checked (`check_preserved`): if a fusion absorbed a LoRA branch, renamed or
    merged a base weight (attention fusion packing Q/K/V into a new tensor), the input model is returned
    unchanged and the reason goes to `self.notes`. So the pass may legitimately do nothing.
    """

    def __init__(self, arch: str | None = None):
        super().__init__()
        self.arch = arch
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.notes = []
        arch = self.arch or guess_arch(model)
        model_type = MODEL_TYPES.get(arch)
        if model_type is None:
            self.notes.append(f"--target ort skipped: no ONNX Runtime fusions for architecture {arch!r}")
            return ir.passes.PassResult(_copy(model), modified=False)
        before = snapshot(model)
        tried = []
        for mt in dict.fromkeys([model_type, "bert"]):
            new, why = self._fuse(model, mt, before)
            if new is not None:
                old_ops, new_ops = count_ops(model), count_ops(new)
                fused_ops = sorted(k for k in new_ops if k not in old_ops)
                self.notes += tried
                self.notes.append(f"--target ort: {mt} fusions applied ({', '.join(fused_ops) or 'no new op types'})")
                return ir.passes.PassResult(new, modified=True)
            tried.append(f"--target ort: {mt} fusions not used: {why}")
        self.notes += tried
        self.notes.append("--target ort skipped: the graph is unchanged")
        return ir.passes.PassResult(_copy(model), modified=False)

    def _fuse(self, model: ir.Model, model_type: str, before) -> tuple[ir.Model | None, str]:
        from onnxruntime.transformers import optimizer

        proto = ir.serde.serialize_model(model)  # the fusers edit it in place
        quiet = io.StringIO()
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                fused = optimizer.optimize_model(proto, model_type=model_type, opt_level=0, use_gpu=False)
        except Exception as e:  # the fusers assume their exporter's graph shapes (e.g. Gemm with a bias)
            msg = str(e).splitlines()[0][:120] if str(e) else ""
            return None, f"they failed ({type(e).__name__}: {msg})"
        new = ir.serde.deserialize_model(fused.model)
        for domain in {n.domain for n in new.graph} - set(new.opset_imports):
            new.opset_imports[domain] = 1  # the fusers add com.microsoft nodes without declaring the domain
        restored = _restore_transposed(model, new)
        try:
            check_preserved(before, new)
        except ContractError as e:
            return None, f"they break the LoRA slots ({e})"
        if count_ops(model) == count_ops(new) and not restored:
            return None, "nothing to fuse"
        return new, ""


def _restore_transposed(old: ir.Model, new: ir.Model) -> int:
    """Base weights that ORT stored transposed get their values back, read through a `Transpose` node."""
    count = 0
    for name, value in base_weights(new).items():
        ref = old.graph.initializers.get(name)
        if ref is None or ref.const_value is None or value.const_value is None or len(ref.shape) != 2:
            continue
        a, b = ref.const_value.numpy(), value.const_value.numpy()
        if a.shape != b.T.shape or np.array_equal(a, b) or not np.array_equal(a.T, b):
            continue
        uses = list(value.uses())
        value.const_value = ir.tensor(a, name=name)
        value.shape = ir.Shape(a.shape)
        transpose = ir.node("Transpose", [value], attributes={"perm": [1, 0]}, name=f"{name}/transpose")
        transpose.outputs[0].name = f"{name}.T"
        transpose.outputs[0].dtype = value.dtype
        transpose.outputs[0].shape = ir.Shape(b.shape)
        first = min((n for n, _ in uses), key=list(new.graph).index) if uses else None
        if first is None:
            continue
        new.graph.insert_before(first, transpose)
        for node, idx in uses:
            node.replace_input_with(idx, transpose.outputs[0])
        count += 1
    return count


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))

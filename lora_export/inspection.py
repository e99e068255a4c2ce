"""What is in a model, an adapter, an ONNX graph or a decoder folder: adapted modules, ranks, scaling,
parameter counts, the folder's shape and adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_export.adapters.adapter import Adapter
from lora_export.artifacts.decoder_folder import CONFIG_NAME, read_folder
from lora_export.artifacts.onnxio import load_onnx_header, proto_dims, read_manifest, slots_of_proto
from lora_export.contract import BANK


def inspect_adapter(adapter: Adapter, base_parameters: int | None = None) -> dict[str, Any]:
    rows = [
        {
            "module": p,
            "r": m.r,
            "in": m.in_features,
            "out": m.out_features,
            "scaling": round(m.scaling, 6),
            "kind": "dora" if m.is_dora else "embedding" if m.embedding else "lora",
            "parameters": sum(t.numel() for t in m.tensors().values()),
        }
        for p, m in sorted(adapter.modules.items())
    ]
    rows += [
        {
            "module": p,
            "r": "",
            "in": "",
            "out": "",
            "scaling": "",
            "kind": "modules_to_save",
            "parameters": sum(t.numel() for t in params.values()),
        }
        for p, params in sorted(adapter.saved.items())
    ]
    info = {"kind": "adapter", **adapter.summary(), "table": rows}
    if base_parameters:
        info["base_parameters"] = base_parameters
        info["trainable_fraction"] = adapter.num_parameters() / base_parameters
    return info


def inspect_model(module, arch: str, source: str, default_targets: list[str] | None) -> dict[str, Any]:
    from lora_export.adapters.inject import unwrap
    from lora_export.adapters.layer import layer_dims, supported_layer
    from lora_export.adapters.spec import LoraSpec

    total = sum(p.numel() for p in module.parameters())
    layers = [(p, m) for p, m in unwrap(module).items() if p and supported_layer(m)]
    spec = LoraSpec(target_modules=default_targets or [])
    rows = [
        {
            "module": p,
            "type": type(m).__name__,
            "in": layer_dims(m)[0],
            "out": layer_dims(m)[1],
            "default_target": spec.matches(p),
        }
        for p, m in layers
    ]
    per_r8 = sum(8 * (r["in"] + r["out"]) for r in rows if r["default_target"])
    return {
        "kind": "model",
        "source": source,
        "arch": arch,
        "parameters": total,
        "lora_capable_layers": len(rows),
        "default_targets": default_targets,
        "r8_default_parameters": per_r8,
        "r8_default_trainable_fraction": per_r8 / total if total else 0.0,
        "table": rows,
    }


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    model = load_onnx_header(path)
    slots = slots_of_proto(model)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    init_params = sum(int(_numel(t.dims)) for t in model.graph.initializer)
    info = {
        "kind": "onnx",
        "path": str(path),
        "layout": slots.layout,
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [_io(i) for i in model.graph.input],
        "outputs": [_io(o) for o in model.graph.output],
        "nodes": len(model.graph.node),
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "initializer_parameters": init_params,
        "lora_modules": len(slots.slots),
        "table": [{"module": s.path, "in": s.in_features, "out": s.out_features} for s in slots.slots.values()],
    }
    if slots.layout == BANK:
        info["max_rank"] = slots.max_rank
    manifest = read_manifest(path)
    if manifest is not None:
        info["manifest"] = manifest.to_dict()
    return info


def is_decoder_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def inspect_decoder_folder(path: str | Path) -> dict[str, Any]:
    """A decoder folder (export-decoder, or ONNX Runtime GenAI's builder): its shape, layout, adapters, graph."""
    folder = read_folder(path)
    facts, graph = folder.facts, inspect_onnx(folder.model_path)
    search = folder.config.get("search", {})
    return {
        "kind": "decoder folder",
        "path": str(folder.path),
        "layout": folder.layout or graph["layout"],
        "layers": facts.num_layers,
        "attention heads": facts.num_attention_heads,
        "kv heads": facts.num_key_value_heads,
        "head size": facts.head_size,
        "vocab": facts.vocab_size,
        "context": facts.context_length,
        "eos": ", ".join(str(e) for e in facts.eos_token_id),
        "tokenizer": folder.has_tokenizer,
        "packed adapters": ", ".join(folder.adapter_files) or "none",
        "search": ", ".join(f"{k}={v}" for k, v in sorted(search.items())),
        "graph": folder.model_path.name,
        "nodes": graph["nodes"],
        "initializer_parameters": graph["initializer_parameters"],
        "lora_modules": graph["lora_modules"],
        "ops": graph["ops"],
        "table": graph["table"],
    }


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _io(v) -> dict[str, Any]:
    import onnx

    t = v.type.tensor_type
    return {
        "name": v.name,
        "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(),
        "shape": proto_dims(v),
    }

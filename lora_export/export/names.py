"""Stable tensor names: base weights keep their module paths (LoRA tensor names come from `contract`)."""

from __future__ import annotations

import onnx_ir as ir

WRAPPER_PREFIX = "model."  # the export wrapper holds the user's model as `self.model`


def clean_param_name(name: str) -> str:
    """`model.transformer.h.0.attn.c_attn.base_layer.weight` -> `transformer.h.0.attn.c_attn.weight`."""
    if name.startswith(WRAPPER_PREFIX):
        name = name[len(WRAPPER_PREFIX) :]
    return name.replace(".base_layer.", ".")


def rename_initializers(model: ir.Model) -> dict[str, str]:
    """Rename parameter initializers in place to their clean module paths; returns old -> new."""
    graph = model.graph
    renamed = {}
    for old in list(graph.initializers):
        new = clean_param_name(old)
        if new != old:
            value = graph.initializers.pop(old)
            value.name = new
            graph.initializers[new] = value
            renamed[old] = new
    return renamed

"""Serving-side API: one branched graph, many adapters, swapped per call or mixed per batch row."""

from lora_export.runtime.session import LoraSession

__all__ = ["LoraSession"]

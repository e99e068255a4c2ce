"""Serving-side API: one branched graph, many adapters, swapped per call or mixed per batch row (`LoraSession`);
token generation over a decoder folder with the KV cache kept in ONNX Runtime (`Generator`)."""

from lora_export.runtime.adapter_store import AdapterStore
from lora_export.runtime.batch import Batch
from lora_export.runtime.generator import GenerationResult, Generator, TokenEvent
from lora_export.runtime.sampling import SamplingParams
from lora_export.runtime.session import LoraSession

__all__ = [
    "AdapterStore",
    "Batch",
    "GenerationResult",
    "Generator",
    "LoraSession",
    "SamplingParams",
    "TokenEvent",
]

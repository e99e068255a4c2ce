"""LoRA spec, the export-friendly LoRA layer, PEFT adapter I/O, injection and merging."""

from lora_export.adapters.adapter import Adapter, ModuleLora
from lora_export.adapters.peft_io import read_adapter, write_peft_adapter
from lora_export.adapters.spec import LoraSpec

__all__ = ["Adapter", "LoraSpec", "ModuleLora", "read_adapter", "write_peft_adapter"]

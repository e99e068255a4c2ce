"""LoRA-aware, name-preserving graph optimization passes (onnx-ir), one pass a file, plus the pipeline.

Every pass is a `LoraPass`: it keeps the LoRA tensor name contract (`lora_export.contract`);
`pipeline.optimize_file` chains them.
"""

from lora_export.passes.bake import BakeAdapterPass
from lora_export.passes.cleanup import CleanupPass
from lora_export.passes.contract import ContractError, LoraPass, check_preserved, snapshot
from lora_export.passes.fp16 import Float16Pass
from lora_export.passes.ort_fusion import OrtFusionPass
from lora_export.passes.pipeline import PipelineOptions, optimize_file, optimize_model
from lora_export.passes.quantize import QuantizeBasePass
from lora_export.passes.scale_fold import FoldLoraScalePass
from lora_export.passes.sibling_fusion import FuseSiblingBranchesPass
from lora_export.passes.transformer_fusion import TransformerFusionPass

__all__ = [
    "BakeAdapterPass",
    "CleanupPass",
    "ContractError",
    "Float16Pass",
    "FoldLoraScalePass",
    "FuseSiblingBranchesPass",
    "LoraPass",
    "OrtFusionPass",
    "PipelineOptions",
    "QuantizeBasePass",
    "TransformerFusionPass",
    "check_preserved",
    "optimize_file",
    "optimize_model",
    "snapshot",
]

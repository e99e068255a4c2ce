"""lora-export: PyTorch models with LoRA adapters to ONNX (merged or branched), verified against PEFT."""

__version__ = "0.1.0"

"""Parity (pure functions over numpy), the PyTorch/PEFT reference, generation and task checks; timing lives in
`lora_export.bench`."""

"""Floating-point types: one vocabulary (`fp32`, `fp16`, `bf16`) for the spellings of numpy, torch, ONNX, onnx-ir."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

DTYPES = ("fp32", "fp16", "bf16")
_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "1": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "10": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "16": "bf16",
}  # fmt: skip


def dtype_name(value: Any) -> str:
    """The name (`fp32` / `fp16` / `bf16`) of a floating type in any spelling: numpy or torch dtypes, ONNX
    element types (int, `FLOAT16`, `tensor(float16)`), onnx-ir `DataType`s, or the names themselves. Unknown
    types raise ValueError."""
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        text = np.dtype(value).name
    elif hasattr(value, "name") and not isinstance(value, str):  # onnx_ir.DataType and friends
        text = value.name
    else:
        text = str(value)
    text = text.lower().removeprefix("torch.").removeprefix("tensor(").removesuffix(")")
    if text not in _ALIASES:
        raise ValueError(f"not a floating-point tensor type we export: {value!r}")
    return _ALIASES[text]


def precision(types: Iterable[Any]) -> str:
    """The precision of a graph from its tensor types: `bf16` / `fp16` when any floating type among `types`
    (any spelling `dtype_name` reads) is reduced precision, else `fp32`; integer and other types are ignored."""
    names = set()
    for t in types:
        try:
            names.add(dtype_name(t))
        except ValueError:
            continue
    return "bf16" if "bf16" in names else "fp16" if "fp16" in names else "fp32"


def numpy_dtype(name: str) -> np.dtype:
    name = dtype_name(name)
    if name == "bf16":
        import ml_dtypes  # onnx's own dependency

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float16 if name == "fp16" else np.float32)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name(name)]

"""The one place that imports TensorRT: lazily, with one-line errors when it or a GPU is missing."""

from __future__ import annotations

from lora_export.errors import MissingDependencyError

INSTALL_HINT = "TensorRT is not installed: pip install 'lora-export[gpu]'"
LOG_LEVELS = ("verbose", "info", "warning", "error")


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot be used here (one line), or None when `import tensorrt` works."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or the PyPI stub failing to fetch its wheel
        return INSTALL_HINT
    return None


def cuda_unavailable() -> str | None:
    """Why no CUDA device can be used (one line), or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False; a CUDA build of torch and an NVIDIA GPU are needed)"
    return None


def unavailable_reason() -> str | None:
    """The first missing piece for anything that runs TensorRT: the package, then a GPU."""
    return tensorrt_unavailable() or cuda_unavailable()


def load_tensorrt(*, need_gpu: bool = True):
    """`import tensorrt`, or raise `MissingDependencyError` (exit code 3) with one line."""
    reason = tensorrt_unavailable()
    if reason:
        raise MissingDependencyError(reason)
    if need_gpu:
        reason = cuda_unavailable()
        if reason:
            raise MissingDependencyError(reason)
    import tensorrt as trt

    return trt


def version_tuple(version: str) -> tuple[int, ...]:
    """`"10.8.0.43"` -> (10, 8, 0, 43); non-numeric tails (`"11.0.0rc1"`) keep their leading digits."""
    parts = []
    for piece in version.split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise ValueError(f"not a version: {version!r}")
    return tuple(parts)


def make_logger(trt, level: str = "warning"):
    severities = {
        "verbose": trt.Logger.VERBOSE,
        "info": trt.Logger.INFO,
        "warning": trt.Logger.WARNING,
        "error": trt.Logger.ERROR,
    }
    return trt.Logger(severities[level])


def trt_dtype_to_numpy(trt, dtype):
    """TensorRT DataType -> numpy dtype (`trt.nptype`), with bfloat16 refused (numpy has none)."""
    import numpy as np

    if hasattr(trt, "bfloat16") and dtype == trt.bfloat16:
        raise MissingDependencyError("bfloat16 weights/tensors are not supported by this tool's numpy path")
    return np.dtype(trt.nptype(dtype))


def trt_dtype_to_torch(trt, dtype):
    import torch

    names = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
        "int32": torch.int32,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }
    for name, torch_dtype in names.items():  # getattr: not every TensorRT version has every type
        if getattr(trt, name, None) == dtype:
            return torch_dtype
    raise MissingDependencyError(f"TensorRT tensor type {dtype} has no torch equivalent here")

"""ONNX Runtime runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_export.backends import Feeds
from lora_export.errors import UserError


def session_options(threads: int | None = None, optimization: str = "all", *, spinning: bool = True):
    """Session options; `spinning=False` for timing: ORT's intra-op threads otherwise keep spinning after a
    call returns and slow down whatever is timed next (PyTorch eager, another session) on a small CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # our LoRA inputs-with-defaults are intentional; keep ORT's warning quiet
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts.graph_optimization_level = levels[optimization]
    return opts


def open_session(
    path: str | Path, providers: list[str] | None = None, threads: int | None = None, *, spinning: bool = True
):
    import onnxruntime as ort

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: export a graph first")
    available = ort.get_available_providers()
    providers = providers or ["CPUExecutionProvider"]
    missing = [p for p in providers if p not in available]
    if missing:
        raise UserError(
            f"ONNX Runtime provider(s) {', '.join(missing)} not available here (have: {', '.join(available)})"
        )
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(threads, spinning=spinning), providers=providers
        )
    except Exception as e:  # ORT raises its own exception types (InvalidGraph, Fail, ...)
        raise UserError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None


def feedable_names(session) -> list[str]:
    """Graph inputs plus inputs backed by a default initializer (the LoRA slots), which ORT lists apart."""
    return [i.name for i in session.get_inputs()] + [i.name for i in session.get_overridable_initializers()]


def cast_feeds(session, feeds: Feeds) -> Feeds:
    """float32 arrays cast to float16 where the graph's input (or LoRA slot) is float16; others as given."""
    values = list(session.get_inputs()) + list(session.get_overridable_initializers())
    half = {i.name for i in values if i.type == "tensor(float16)"}
    return {k: v.astype(np.float16) if k in half and v.dtype == np.float32 else v for k, v in feeds.items()}


class OrtRunner:
    name = "ort"

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None, *, spinning: bool = True
    ):
        self.path, self.providers, self.threads, self.spinning = Path(path), providers, threads, spinning
        self.session = None

    def __enter__(self) -> OrtRunner:
        self.session = open_session(self.path, self.providers, self.threads, spinning=self.spinning)
        self.input_names = feedable_names(self.session)
        self.output_names = [o.name for o in self.session.get_outputs()]
        return self

    def __exit__(self, *exc) -> None:
        self.session = None

    def infer(self, feeds: Feeds, run_options=None) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds, run_options)))

    # -- latency harness (lora_export.bench.latency): inputs prepared outside the timed region ---------------
    def _device(self) -> tuple[str, int]:
        providers = self.session.get_providers() if self.session is not None else []
        return ("cuda", 0) if providers and providers[0] == "CUDAExecutionProvider" else ("cpu", 0)

    def prepare(self, feeds: Feeds, run_options=None):
        """Feeds as `OrtValue`s on the session's device (dtype-cast to the graph's), ready for `run_prepared`."""
        import onnxruntime as ort

        device, device_id = self._device()
        values = {
            k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, device_id)
            for k, v in cast_feeds(self.session, feeds).items()
            if k in self.input_names
        }
        return values, run_options

    def run_prepared(self, handle) -> None:
        values, run_options = handle
        self.session.run_with_ort_values(self.output_names, values, run_options)

    def synchronize(self) -> None:
        """`run_with_ort_values` returns once the outputs are computed; nothing is left in flight."""

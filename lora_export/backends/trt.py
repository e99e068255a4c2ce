"""TensorRT runner: deserialize a plan, bind torch CUDA tensors by address, `execute_async_v3` on a stream.

Same small interface as the other runners (`with TrtRunner(plan) as r: r.infer(feeds)`), plus what the
latency harness drives: `prepare(feeds) -> handle` (inputs copied to the GPU, shapes set, outputs
allocated), `run_prepared(handle)` (enqueue only; replays a CUDA graph when `cuda_graph=True`) and
`synchronize()`. `stream` is the torch stream the engine runs on, for CUDA-event timing; `elapsed_ms`
times a prepared handle with CUDA events.

LoRA inputs (engines built with `--lora-as inputs`) that a feed leaves out are bound as rank-0 tensors
(no adapter). Every binding gets at least one element of memory: TensorRT wants a valid address even
for an empty tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_export.backends import Feeds
from lora_export.contract import is_lora_tensor
from lora_export.engines import _trt
from lora_export.errors import UserError


@dataclass
class Prepared:
    """Device tensors bound for one set of input shapes."""

    inputs: dict  # name -> torch.Tensor (CUDA)
    outputs: dict  # name -> torch.Tensor (CUDA), shaped
    buffers: dict = field(default_factory=dict)  # name -> backing tensor (>= 1 element)
    graph: object = None  # torch.cuda.CUDAGraph when captured


class TrtRunner:
    name = "trt"
    device = "cuda"

    def __init__(self, plan: str | Path, *, cuda_graph: bool = False, log_level: str = "warning", device: int = 0):
        self.plan, self.cuda_graph, self.log_level, self.device_index = Path(plan), cuda_graph, log_level, device
        self.engine = self.context = self.stream = None
        self._bound: Prepared | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> TrtRunner:
        if not self.plan.exists():
            raise UserError(f"{self.plan} does not exist: build an engine first (lora-export build-engine)")
        self.trt = trt = _trt.load_tensorrt()
        import torch

        self.torch = torch
        torch.cuda.set_device(self.device_index)
        self.logger = _trt.make_logger(trt, self.log_level)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT {trt.__version__} cannot load {self.plan} (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: _trt.trt_dtype_to_torch(trt, self.engine.get_tensor_dtype(n)) for n in names}
        return self

    def __exit__(self, *exc) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self._bound = None
        self.context = self.engine = self.runtime = None

    # -- binding ---------------------------------------------------------------------------------------
    def _input_array(self, name: str, feeds: Feeds) -> np.ndarray:
        if name in feeds:
            return np.ascontiguousarray(feeds[name])
        if is_lora_tensor(name):  # no adapter: rank 0 in every dynamic dim
            shape = [0 if d < 0 else d for d in self.engine.get_tensor_shape(name)]
            return np.zeros(shape, np.float32)
        raise UserError(f"feed for engine input {name!r} is missing (have: {', '.join(sorted(feeds))})")

    def prepare(self, feeds: Feeds) -> Prepared:
        torch = self.torch
        prepared = Prepared({}, {})
        with torch.cuda.stream(self.stream):
            for name in self.input_names:
                host = torch.from_numpy(self._input_array(name, feeds))
                shape = tuple(host.shape)
                buf = torch.empty(max(host.numel(), 1), dtype=self.dtypes[name], device="cuda")
                view = buf[: host.numel()].view(shape)
                view.copy_(host.to(self.dtypes[name]), non_blocking=False)
                prepared.inputs[name], prepared.buffers[name] = view, buf
            self._bind_inputs(prepared)
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise UserError(f"output {name} has unresolved shape {shape}: an input shape is missing")
                n = int(np.prod(shape)) if shape else 1
                buf = torch.empty(max(n, 1), dtype=self.dtypes[name], device="cuda")
                prepared.outputs[name], prepared.buffers[name] = buf[:n].view(shape), buf
            self._bind_addresses(prepared)
        if self.cuda_graph:
            self._capture(prepared)
        return prepared

    def _bind_inputs(self, prepared: Prepared) -> None:
        for name, t in prepared.inputs.items():
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise UserError(f"input {name} shape {tuple(t.shape)} is outside the engine's profile")

    def _bind_addresses(self, prepared: Prepared) -> None:
        for name, buf in prepared.buffers.items():
            if not self.context.set_tensor_address(name, buf.data_ptr()):
                raise UserError(f"TensorRT refused the address of {name}")
        self._bound = prepared

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise UserError("TensorRT execute_async_v3 failed (rerun with --log-level verbose)")

    def _capture(self, prepared: Prepared) -> None:
        """Record one enqueue into a CUDA graph (after a warm-up enqueue, as TensorRT asks)."""
        torch = self.torch
        self._enqueue()
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._enqueue()
        prepared.graph = graph

    # -- running ---------------------------------------------------------------------------------------
    def run_prepared(self, prepared: Prepared) -> None:
        """Enqueue one run on `self.stream` (no synchronization)."""
        if prepared.graph is not None:
            with self.torch.cuda.stream(self.stream):
                prepared.graph.replay()
            return
        if self._bound is not prepared:
            self._bind_inputs(prepared)
            self._bind_addresses(prepared)
        self._enqueue()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        prepared = self.prepare(feeds)
        self.run_prepared(prepared)
        self.synchronize()
        return {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in prepared.outputs.items()}

    def elapsed_ms(self, prepared: Prepared, iters: int = 20, warmup: int = 3) -> list[float]:
        """Per-run milliseconds measured with CUDA events on the engine's stream."""
        torch = self.torch
        for _ in range(warmup):
            self.run_prepared(prepared)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.run_prepared(prepared)
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times

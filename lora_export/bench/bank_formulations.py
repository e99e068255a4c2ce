"""Why the bank layout is dense: time per-row LoRA formulations for one GPT-2-small `c_attn` on ONNX Runtime.

Formulations (x: [B, T, in], W: [in, out], N adapters of rank R, `idx`: [B]):
  base     x·W
  single   x·W + (x·A)·B                          one adapter for the whole batch (the `inputs` layout)
  dense    x·W + ((x·A_cat) ⊙ mask[idx])·B_cat    A_cat [in, N·R], B_cat [N·R, out] (our `bank` layout)
  gather   x·W + bmm(bmm(x, A[idx]), B[idx])      per-row gather + batched matmul

Its command line is `tools/bench_bank_formulations.py`.

Prints medians and ratios to `single`, measured interleaved in one process.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


@dataclass
class FormulationOptions:
    batch: int = 8
    seq: int = 128
    adapters: int = 4
    rank: int = 8
    iters: int = 50
    d_in: int = 768
    d_out: int = 2304


def build(kind: str, d_in: int, d_out: int, n: int, r: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    W = numpy_helper.from_array(rng.standard_normal((d_in, d_out), dtype=np.float32) * 0.02, "W")
    inits, nodes = [W], [helper.make_node("MatMul", ["x", "W"], ["base"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", d_in])]
    if kind == "base":
        nodes.append(helper.make_node("Identity", ["base"], ["y"]))
    elif kind == "single":
        inits += [
            numpy_helper.from_array(rng.standard_normal((d_in, r), dtype=np.float32), "A"),
            numpy_helper.from_array(rng.standard_normal((r, d_out), dtype=np.float32) * 0.01, "Bm"),
        ]
        nodes += [
            helper.make_node("MatMul", ["x", "A"], ["xa"]),
            helper.make_node("MatMul", ["xa", "Bm"], ["d"]),
            helper.make_node("Add", ["base", "d"], ["y"]),
        ]
    else:
        inputs.append(helper.make_tensor_value_info("idx", TensorProto.INT64, ["B"]))
        a_bank = rng.standard_normal((n, d_in, r), dtype=np.float32)
        b_bank = rng.standard_normal((n, r, d_out), dtype=np.float32) * 0.01
        if kind == "dense":
            a_cat = a_bank.transpose(1, 0, 2).reshape(d_in, n * r)
            owner = (np.arange(n * r) // r).astype(np.int64)
            masks = (owner[None, :] == np.arange(n)[:, None]).astype(np.float32)  # [N, N*R]
            inits += [
                numpy_helper.from_array(a_cat, "A"),
                numpy_helper.from_array(b_bank.reshape(n * r, d_out), "Bm"),
                numpy_helper.from_array(masks, "masks"),
                numpy_helper.from_array(np.array([1], np.int64), "one"),
            ]
            nodes += [
                helper.make_node("Gather", ["masks", "idx"], ["m"], axis=0),  # [B, N*R]
                helper.make_node("Unsqueeze", ["m", "one"], ["m3"]),  # [B, 1, N*R]
                helper.make_node("MatMul", ["x", "A"], ["xa"]),
                helper.make_node("Mul", ["xa", "m3"], ["xm"]),
                helper.make_node("MatMul", ["xm", "Bm"], ["d"]),
                helper.make_node("Add", ["base", "d"], ["y"]),
            ]
        else:  # gather
            inits += [numpy_helper.from_array(a_bank, "Ab"), numpy_helper.from_array(b_bank, "Bb")]
            nodes += [
                helper.make_node("Gather", ["Ab", "idx"], ["a"], axis=0),  # [B, in, R]
                helper.make_node("Gather", ["Bb", "idx"], ["b"], axis=0),  # [B, R, out]
                helper.make_node("MatMul", ["x", "a"], ["xa"]),
                helper.make_node("MatMul", ["xa", "b"], ["d"]),
                helper.make_node("Add", ["base", "d"], ["y"]),
            ]
    graph = helper.make_graph(nodes, kind, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def measure_formulations(args: FormulationOptions) -> dict[str, float]:
    """Median ms per formulation (base, single, dense, gather), interleaved with a rotating order."""
    kinds = ["base", "single", "dense", "gather"]
    sessions = {
        k: ort.InferenceSession(
            build(k, args.d_in, args.d_out, args.adapters, args.rank), providers=["CPUExecutionProvider"]
        )
        for k in kinds
    }
    x = np.random.default_rng(1).standard_normal((args.batch, args.seq, args.d_in), dtype=np.float32)
    idx = np.arange(args.batch, dtype=np.int64) % args.adapters
    feeds = {k: ({"x": x} if k in ("base", "single") else {"x": x, "idx": idx}) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(5):
        for k in kinds:
            sessions[k].run(None, feeds[k])
    for i in range(args.iters):
        for k in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:  # rotate the order: no position bias
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def report_lines(med: dict[str, float], args: FormulationOptions) -> list[str]:
    """The printed table: medians and ratios to `single`."""
    lines = [
        f"ONNX Runtime {ort.__version__} CPU, x [{args.batch}, {args.seq}, {args.d_in}] -> {args.d_out}, "
        f"N={args.adapters} adapters, rank {args.rank}, {args.iters} interleaved iterations",
        f"{'formulation':<10} {'median ms':>10} {'/ single':>9}",
    ]
    for k in med:
        lines.append(f"{k:<10} {med[k]:>10.3f} {med[k] / med['single']:>9.3f}")
    return lines

"""Build a TensorRT engine (`OUT.plan`) and its manifest (`OUT.plan.json`) from an exported graph.

TensorRT calls (10.x and 11.x Python API): `Builder(logger)`, `create_network(flags)`,
`OnnxParser(network, logger).parse_from_file`, `create_builder_config`, `set_flag(BuilderFlag.REFIT)`,
`set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)`, `create_optimization_profile` +
`set_shape(name, min, opt, max)` + `add_optimization_profile`, `create_timing_cache` / `set_timing_cache` /
`get_timing_cache().serialize()` / `ITimingCache.combine`, `IProgressMonitor`, `build_serialized_network`,
then `Runtime.deserialize_cuda_engine` + `Refitter.get_all_weights` to record what is refittable.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from lora_export.artifacts.fileio import atomic_path, check_output_path, sha256_file
from lora_export.artifacts.onnxio import read_manifest
from lora_export.artifacts.plan_manifest import PlanManifest
from lora_export.contract import GraphManifest
from lora_export.engines import _trt
from lora_export.engines.flags import FlagChoice, select_flags
from lora_export.engines.graph import PreparedGraph, precision_of, prepare_graph, save_graph
from lora_export.engines.profiles import InputProfile, resolve_profiles
from lora_export.engines.refit_plan import GraphWeights, changed_weights
from lora_export.errors import UserError

Progress = Callable[[str], None]


@dataclass
class BuildOptions:
    shapes: list[str] = field(default_factory=list)  # `--shapes` entries
    refit: bool = False
    timing_cache: Path | None = None
    workspace_mb: int | None = None
    log_level: str = "warning"
    lora_as: str = "inputs"  # branched graphs: LoRA tensors as engine inputs, or as refittable weights
    lora_rank: int | None = None  # rank R for lora_as="weights"
    base_graph: Path | None = None  # base (adapter-free) graph for refitting merged engines


@dataclass
class BuildResult:
    path: Path
    manifest: PlanManifest
    seconds: float


@dataclass
class BuildPlan:
    """Everything decided before TensorRT runs (pure; tested on CPU)."""

    prepared: PreparedGraph
    profiles: list[InputProfile]
    precision: str
    flags: FlagChoice


def plan_build(onnx_path: Path, options: BuildOptions, version: tuple[int, ...]) -> BuildPlan:
    graph_manifest = _graph_manifest(onnx_path)
    model = onnx.load(str(onnx_path))
    if options.refit:
        from lora_export.passes.quantize import refuse_quantized

        refuse_quantized(model, "build-engine --refit")
    prepared = prepare_graph(model, graph_manifest, lora_as=options.lora_as, lora_rank=options.lora_rank)
    profiles = resolve_profiles(prepared.inputs, options.shapes)
    precision = precision_of(prepared.model)
    flags = select_flags(version, precision, refit=options.refit)
    if options.lora_as == "weights" and prepared.lora_as == "weights" and not options.refit:
        raise UserError("--lora-as weights builds zero LoRA weights; add --refit so adapters can be refit in")
    return BuildPlan(prepared, profiles, precision, flags)


def _graph_manifest(onnx_path: Path) -> GraphManifest | None:
    return read_manifest(onnx_path)


class _Monitor:
    """Builds a `trt.IProgressMonitor` that reports top-level phases through `progress`."""

    @staticmethod
    def create(trt, progress: Progress):
        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.parents: dict[str, str | None] = {}

            def phase_start(self, phase_name, parent_phase, num_steps):
                self.parents[phase_name] = parent_phase
                if parent_phase is None:
                    progress(f"{phase_name} ({num_steps} steps)")

            def step_complete(self, phase_name, step):
                return True  # never cancel

            def phase_finish(self, phase_name):
                if self.parents.pop(phase_name, None) is None:
                    progress(f"{phase_name} done")

        return Monitor()


def _parse(trt, network, logger, path: Path):
    """Parse into `network`; returns the parser, which owns the weights and must outlive the build."""
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    if ok:
        return parser
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = e.node_name() or (f"node #{e.node()}" if e.node() >= 0 else "graph")
        op = e.node_operator()
        lines.append(f"  {node}{f' ({op})' if op else ''}: {e.desc()}")
    raise UserError("TensorRT's ONNX parser rejected the graph:\n" + "\n".join(lines or ["  (no details)"]))


def _add_profile(trt, builder, network, config, profiles: list[InputProfile]) -> None:
    by_name = {p.name: p for p in profiles}
    profile = builder.create_optimization_profile()
    names = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        names.append(tensor.name)
        dynamic = any(d < 0 for d in tensor.shape)
        p = by_name.get(tensor.name)
        if p is None:
            if dynamic:
                raise UserError(
                    f"input {tensor.name} {tuple(tensor.shape)} is dynamic: pass --shapes {tensor.name}:..."
                )
            continue
        profile.set_shape(tensor.name, p.min, p.opt, p.max)
    extra = sorted(set(by_name) - set(names))
    if extra:
        raise UserError(
            f"--shapes/profile for {extra[0]}: not an input of the parsed network (have: {', '.join(names)})"
        )
    config.add_optimization_profile(profile)


def _load_timing_cache(config, path: Path | None):
    data = path.read_bytes() if path is not None and path.exists() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if path.exists():  # another build may have grown it meanwhile: keep both
        cache.combine(config.create_timing_cache(path.read_bytes()), True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(memoryview(cache.serialize())))


def io_tensors(trt, engine) -> dict[str, list[dict]]:
    io: dict[str, list[dict]] = {"inputs": [], "outputs": []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = {
            "name": name,
            "dtype": str(engine.get_tensor_dtype(name)).replace("DataType.", "").lower(),
            "shape": list(engine.get_tensor_shape(name)),
        }
        mode = engine.get_tensor_mode(name)
        io["inputs" if mode == trt.TensorIOMode.INPUT else "outputs"].append(entry)
    return io


def build_engine(
    onnx_path: str | Path,
    out: str | Path,
    options: BuildOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Parse `onnx_path`, build with profiles/flags from `options`, write `out` and `out.json`."""
    options = options or BuildOptions()
    progress = progress or (lambda _msg: None)
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise UserError(f"{onnx_path} does not exist: export a graph first")
    if options.log_level not in _trt.LOG_LEVELS:
        raise UserError(f"--log-level {options.log_level!r}: choose {', '.join(_trt.LOG_LEVELS)}")
    out = check_output_path(out, force)
    trt = _trt.load_tensorrt()
    version = _trt.version_tuple(trt.__version__)
    plan = plan_build(onnx_path, options, version)
    base_entry = _base_graph_entry(onnx_path, plan.prepared.kind, options.base_graph)  # checked before the build
    current = _initial_adapter(onnx_path, plan.prepared, options.base_graph)
    logger = _trt.make_logger(trt, options.log_level)

    builder = trt.Builder(logger)
    network_flags = 0
    for name in plan.flags.network_flags:
        network_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(network_flags)
    with tempfile.TemporaryDirectory(prefix="lora-export-trt-") as tmp:
        progress("parsing the graph")
        parser = _parse(trt, network, logger, save_graph(plan.prepared.model, Path(tmp) / onnx_path.name))
        config = builder.create_builder_config()
        for name in plan.flags.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        if options.workspace_mb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
        _add_profile(trt, builder, network, config, plan.profiles)
        if options.timing_cache is not None:
            _load_timing_cache(config, Path(options.timing_cache))
        if hasattr(trt, "IProgressMonitor"):
            config.progress_monitor = _Monitor.create(trt, progress)
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        del parser  # owned the weights until the build copied them
    if serialized is None:
        raise UserError("TensorRT could not build the engine; rerun with --log-level verbose to see why")
    data = bytes(memoryview(serialized))
    with atomic_path(out, suffix=".plan") as tmp_plan:
        tmp_plan.write_bytes(data)
    if options.timing_cache is not None:
        _save_timing_cache(config, Path(options.timing_cache))

    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        raise UserError(f"TensorRT built {out} but cannot load it back (rerun with --log-level verbose)")
    refittable = sorted(trt.Refitter(engine, logger).get_all_weights()) if options.refit else []
    manifest = PlanManifest(
        tensorrt=trt.__version__,
        source={
            "path": str(onnx_path.resolve()),
            "sha256": sha256_file(onnx_path),
            "kind": plan.prepared.kind,
            "precision": plan.precision,
        },
        profiles=[p.to_dict() for p in plan.profiles],
        flags={
            **plan.flags.to_dict(),
            "workspace_mb": options.workspace_mb,
            "timing_cache": str(options.timing_cache) if options.timing_cache else None,
        },
        refittable=options.refit,
        refittable_weights=refittable,
        io=io_tensors(trt, engine),
        lora_as=plan.prepared.lora_as,
        lora_rank=plan.prepared.lora_rank,
        lora_modules=plan.prepared.lora_modules,
        weights_dtype=plan.prepared.weights_dtype,
        base_graph=base_entry,
        current_adapter=current,
        build_seconds=round(seconds, 3),
    )
    manifest.write(out)
    return BuildResult(out, manifest, seconds)


def _base_graph_entry(onnx_path: Path, kind: str, base: Path | None) -> dict | None:
    if base is not None:
        base = Path(base)
        if not base.exists():
            raise UserError(f"--base {base} does not exist")
        from lora_export.passes.quantize import refuse_quantized

        refuse_quantized(onnx.load(str(base), load_external_data=False), "a TensorRT refit (--base)")
        return {"path": str(base.resolve()), "sha256": sha256_file(base)}
    if kind in ("base", "branched-inputs"):  # the graph itself holds the base weights
        return {"path": str(onnx_path.resolve()), "sha256": sha256_file(onnx_path)}
    return None


def _initial_adapter(onnx_path: Path, prepared: PreparedGraph, base: Path | None) -> dict | None:
    """The adapter baked into the engine at build time (merged graphs), with the weights it changed."""
    if prepared.kind != "merged":
        return None  # base graphs and branched graphs (zero LoRA weights) start at the base model
    graph_manifest = _graph_manifest(onnx_path)
    info = dict(((graph_manifest.adapters if graph_manifest else None) or [{}])[0])
    entry = {"name": info.get("name"), "source": info.get("source"), "sha256": info.get("sha256"), "weights": None}
    if base is not None:
        entry["weights"] = changed_weights(GraphWeights(prepared.model), GraphWeights(onnx.load(str(base))))
    return entry

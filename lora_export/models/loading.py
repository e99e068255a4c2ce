"""Resolve MODEL on the command line: `sample:NAME`, a local transformers directory, or `py:mod:factory`."""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_export.errors import UserError
from lora_export.models import e2e
from lora_export.models import inputs as inputs_mod
from lora_export.models.introspect import VISION, describe
from lora_export.models.pretrained import PRETRAINED, parse_name
from lora_export.models.pretrained import model_dir as pretrained_dir
from lora_export.models.skeleton import params_on_meta, shared_module
from lora_export.models.zoo import SAMPLES, build_sample


@dataclass
class LoadedModel:
    """A model ready to trace: what it takes, what it returns, how to make inputs for it.

    A lazily loaded model (`load_model(spec, lazy=True)`) has a weightless `module` (parameters on the meta
    device): exports stream its weights from `checkpoint` (a safetensors directory) or from the model that
    `rebuild` makes; `materialized()` gives the model with its weights, for running it.
    """

    module: nn.Module
    arch: str
    source: str
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    make_inputs: inputs_mod.InputMaker
    default_seq: int = 16
    extra: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None  # lazy: the safetensors directory holding the weights
    rebuild: Callable[[], LoadedModel] | None = None  # lazy: makes this model with its weights

    def materialized(self) -> LoadedModel:
        """This model with its weights: itself, or (lazy) a freshly loaded one the caller owns."""
        return self.rebuild() if self.rebuild is not None else self

    def copy(self, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
        """This model with a private deep copy of its module (moved to `device` / cast to `dtype` when given),
        for a caller that merges, wraps or casts it while the original stays as it is."""
        work = copy.copy(self)
        work.module = copy.deepcopy(self.module)
        if device is not None or dtype is not None:
            work.module = work.module.to(device=device, dtype=dtype)
        return work

    def owned(self, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
        """This model (materialized) for a caller that wraps its modules (LoRA layers, a reference): the same
        weight tensors under a new module tree when they already have `device` and `dtype`, else a converted
        copy; the caller's model is never changed."""
        model = self.materialized()
        floating = [t for t in [*model.module.parameters(), *model.module.buffers()] if t.is_floating_point()]
        if all(t.device == torch.device(device) and t.dtype == dtype for t in floating):
            own = copy.copy(model)
            own.module = shared_module(model.module)
            return own
        return model.copy(device=device, dtype=dtype)

    def forward(self, feeds: inputs_mod.Inputs) -> dict[str, torch.Tensor]:
        """Run the model on named inputs; outputs by name, in `output_names` order."""
        with torch.no_grad():
            return dict(zip(self.output_names, call_model(self, feeds)))


def call_model(model: LoadedModel, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The single forward call every path (reference, export) goes through."""
    if model.arch == "py":
        out = model.module(*[feeds[n] for n in model.input_names])
        if isinstance(out, torch.Tensor):
            return (out,)
        if isinstance(out, dict):
            return tuple(out[n] for n in model.output_names)
        return tuple(out)
    if model.arch == "convnet":
        return (model.module(feeds["pixel_values"]),)
    out = model.module(**feeds, **model.extra.get("call_kwargs", {}))
    return tuple(out[n] for n in model.output_names)


def load_model(spec: str, *, lazy: bool = False) -> LoadedModel:
    """The model `spec` names. `lazy`: without its weights where it can be (a transformers directory saved
    with safetensors, a transformers sample), for exports that stream the weights and checks that load
    them once, when needed; `py:` factories always build their model."""
    if spec.startswith("sample:"):
        return _load_sample(spec[len("sample:") :], spec, lazy)
    if spec.startswith("py:"):
        return _load_py(spec)
    path = Path(spec)
    if path.is_dir():
        return _load_transformers_dir(path, spec, lazy)
    names = ", ".join(f"sample:{n}" for n in [*SAMPLES, e2e.NAME, *PRETRAINED])
    raise UserError(
        f"model {spec!r} not found: give a local transformers directory, py:package.module:factory, or one of {names}"
    )


def _load_sample(name: str, spec: str, lazy: bool = False) -> LoadedModel:
    if name == e2e.NAME:  # trained, shipped as a transformers directory
        return _load_transformers_dir(e2e.model_dir(), spec, lazy)
    if (pretrained := parse_name(name)) is not None:  # a registry package's real weights, converted once
        return _load_transformers_dir(pretrained_dir(*pretrained), spec, lazy)
    if name not in SAMPLES:
        choices = [*SAMPLES, e2e.NAME, *PRETRAINED, *(f"{n}-4l" for n in PRETRAINED)]
        raise UserError(f"unknown sample {name!r}: choose one of {', '.join(choices)}")
    if lazy and SAMPLES[name].model_class:
        with params_on_meta():
            module, _ = build_sample(name)
        return _wrap_skeleton(module, spec, lambda: _load_sample(name, spec))
    module, sample = build_sample(name)
    if sample.arch == "convnet":
        return LoadedModel(
            module=module,
            arch="convnet",
            source=spec,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
            make_inputs=lambda b, s, seed: inputs_mod.image_inputs(b, s, seed),
            default_seq=16,
        )
    return wrap_transformers(module, spec)


def wrap_transformers(module: nn.Module, spec: str, probe: nn.Module | None = None) -> LoadedModel:
    """A transformers model with its I/O read from the model (class, forward signature, config, one probe
    forward, on `probe` when given: a stand-in of the same class and shapes)."""
    module.eval()
    config = module.config
    io = describe(module if probe is None else probe.eval(), spec)
    return LoadedModel(
        module=module,
        arch=config.model_type,
        source=spec,
        input_names=io.input_names,
        output_names=io.output_names,
        dynamic_axes=io.dynamic_axes,
        make_inputs=io.make_inputs(int(getattr(config, "vocab_size", 0) or 2)),
        default_seq=io.image_size if io.kind == VISION else 16,
        extra={"config": config.to_dict() if hasattr(config, "to_dict") else {}, "call_kwargs": io.call_kwargs},
    )


def _load_transformers_dir(path: Path, spec: str, lazy: bool = False) -> LoadedModel:
    import transformers

    from lora_export.artifacts.checkpoint import checkpoint_files

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download
    if not (path / "config.json").exists():
        raise UserError(f"{path} has no config.json: expected a transformers save_pretrained directory")
    files = checkpoint_files(path) if lazy else None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        arch_names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, arch_names[0], None) if arch_names else None
        if files is not None:
            module = _skeleton_from_config(cls or transformers.AutoModel, config, files)
            _read_generation_config(module, path)
        else:
            cls = cls or transformers.AutoModel
            load = cls.from_pretrained if cls is not transformers.AutoModel else transformers.AutoModel.from_pretrained
            module = load(str(path), local_files_only=True, attn_implementation="eager", torch_dtype=torch.float32)
    except Exception as e:  # a broken directory: truncated weights, a config field of the wrong type, ...
        raise UserError(
            f"cannot load {path} as a transformers model ({type(e).__name__}: {_first_line(e)}): check its config.json "
            "and weights (re-save it with save_pretrained)"
        ) from e
    module.config.use_cache = False
    if files is not None:
        loaded = _wrap_skeleton(module, spec, lambda: _load_transformers_dir(path, spec))
        if loaded.rebuild is None:  # it needed its weights after all
            return _drop_inputs_the_tokenizer_lacks(loaded, path)
        loaded.checkpoint = path
    else:
        loaded = wrap_transformers(module, spec)
    _drop_inputs_the_tokenizer_lacks(loaded, path)
    loaded.extra["model_dir"] = str(path)  # where its tokenizer files are (spec may be sample:e2e)
    return loaded


OPTIONAL_TEXT_INPUTS = ("token_type_ids",)  # the model makes its own default (zeros) when they are not given


def tokenizer_input_names(path: Path) -> list[str] | None:
    """The inputs the model directory's tokenizer returns (`model_input_names`), None without a tokenizer."""
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    import transformers

    try:
        return list(transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True).model_input_names)
    except Exception:  # an unreadable tokenizer: keep the inputs the model takes
        return None


def _drop_inputs_the_tokenizer_lacks(loaded: LoadedModel, path: Path) -> LoadedModel:
    """Graph inputs the model's own tokenizer never returns (RoBERTa's tokenizer and `token_type_ids`) are left
    to the model's default, so the graph runs on the tokenizer's output alone."""
    optional = [n for n in OPTIONAL_TEXT_INPUTS if n in loaded.input_names]
    produced = tokenizer_input_names(path) if optional else None
    dropped = [n for n in optional if produced is not None and n not in produced]
    if dropped:
        names = [n for n in loaded.input_names if n not in dropped]
        vocab = int(loaded.extra.get("config", {}).get("vocab_size", 0) or 2)
        loaded.input_names = names
        loaded.dynamic_axes = {k: v for k, v in loaded.dynamic_axes.items() if k not in dropped}
        loaded.make_inputs = lambda b, s, seed: inputs_mod.text_inputs(names, vocab, b, s, seed)
        loaded.extra["dropped_inputs"] = dropped
    return loaded


def _wrap_skeleton(module: nn.Module, spec: str, rebuild) -> LoadedModel:
    """A weightless model with `rebuild` to load its weights. A model whose probe forward cannot run on meta
    weights (data-dependent checks such as BERT's `.item()` on its mask) is probed on a random stand-in of the
    same shapes (its memory is held only for the probe)."""
    try:
        loaded = wrap_transformers(module, spec)
    except UserError:  # probe a stand-in with real (random) tensors of the same shapes, then drop it
        stand_in = copy.deepcopy(module)  # buffers (position ids, ...) stay the real ones
        for sub in stand_in.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_meta:
                    sub._parameters[name] = nn.Parameter(torch.randn(p.shape).to(p.dtype) * 0.02, requires_grad=False)
        loaded = wrap_transformers(module, spec, probe=stand_in)
        del stand_in
    loaded.rebuild = rebuild
    return loaded


def _read_generation_config(module: nn.Module, path: Path) -> None:
    """As `from_pretrained` does for a model that can generate: its directory's generation_config.json (eos,
    pad and sampling defaults) replaces the one derived from config.json."""
    import transformers

    can_generate = getattr(module, "can_generate", None)
    if (path / "generation_config.json").is_file() and callable(can_generate) and can_generate():
        module.generation_config = transformers.GenerationConfig.from_pretrained(str(path), local_files_only=True)


def _skeleton_from_config(cls, config, files: dict[str, Path]) -> nn.Module:
    """The model `from_pretrained` would build, with its parameters on the meta device; persistent buffers
    stored in the checkpoint are read (they are small), the others keep their constructed values."""
    import transformers

    from lora_export.artifacts.checkpoint import read_tensor

    config._attn_implementation = "eager"
    with params_on_meta():
        if cls is transformers.AutoModel:
            module = transformers.AutoModel.from_config(config)
        else:
            module = cls(config)
    module = module.float()  # as from_pretrained(torch_dtype=float32): floating buffers in float32
    for name, buf in list(module.named_buffers()):
        if name in files:
            owner, _, attr = name.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            target._buffers[attr] = read_tensor(files[name], name).to(buf.dtype)
    return module.eval()


def _load_py(spec: str) -> LoadedModel:
    target = spec[len("py:") :]
    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise UserError(f"{spec!r}: expected py:package.module:factory")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as e:  # ImportError, AttributeError, or the module's own code failing on import
        raise UserError(
            f"{spec!r}: cannot import the factory ({type(e).__name__}: {_first_line(e)}); rerun with --verbose "
            "for its traceback"
        ) from e
    try:
        result = factory()
    except Exception as e:
        raise UserError(
            f"{spec!r}: the factory raised {type(e).__name__}: {_first_line(e)}; fix it (rerun with --verbose for "
            "its traceback)"
        ) from e
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise UserError(f"{spec!r}: the factory must return (torch.nn.Module, dict of example input tensors)")
    module, example = result[0], result[1]
    axes = result[2] if len(result) > 2 else None
    if not isinstance(module, nn.Module) or not isinstance(example, dict):
        raise UserError(f"{spec!r}: the factory must return (torch.nn.Module, dict of example input tensors)")
    module.eval()
    names = list(example)
    try:
        with torch.no_grad():
            out = module(*[example[n] for n in names])
    except Exception as e:
        raise UserError(
            f"{spec!r}: the factory's model fails on its own example inputs ({type(e).__name__}: {_first_line(e)}); "
            "rerun with --verbose for its traceback"
        ) from e
    if isinstance(out, torch.Tensor):
        outputs = ["output"]
    elif isinstance(out, dict):
        outputs = list(out)
    else:
        outputs = [f"output_{i}" for i in range(len(out))]
    if axes is None:
        axes = {n: {0: "batch"} for n, t in example.items() if t.dim() > 0}
        axes.update({o: {0: "batch"} for o in outputs})
    return LoadedModel(
        module=module,
        arch="py",
        source=spec,
        input_names=names,
        output_names=outputs,
        dynamic_axes=axes,
        make_inputs=lambda b, s, seed: inputs_mod.like_inputs(example, b, seed),
        default_seq=0,
    )


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__

"""Find target modules, check an adapter against a model, wrap modules with `LoraLayer`, merge."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import nn

from lora_export.adapters.adapter import Adapter, ModuleLora
from lora_export.adapters.layer import (
    BranchFeed,
    LoraLayer,
    layer_dims,
    merged_weight,
    supported_layer,
)
from lora_export.adapters.spec import LoraSpec
from lora_export.errors import AdapterError


def unwrap(model: nn.Module) -> dict[str, nn.Module]:
    """Module paths as PEFT names them, looking through our `LoraLayer` wrappers."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            continue
        if name.endswith(".base_layer"):
            name = name[: -len(".base_layer")]
        out[name] = mod
    return out


ALL_LINEAR = "all-linear"


def is_all_linear(targets: list[str] | str) -> bool:
    """PEFT's `target_modules="all-linear"` shorthand (also as the only item of a list, as `--targets` gives it)."""
    items = [targets] if isinstance(targets, str) else list(targets)
    return len(items) == 1 and isinstance(items[0], str) and items[0].lower() == ALL_LINEAR


def output_layer_path(model: nn.Module) -> str | None:
    """The path of a transformers model's output layer (`lm_head`), which PEFT's all-linear leaves out."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return None
    return next((p for p, m in unwrap(model).items() if m is out or getattr(m, "base_layer", None) is out), None)


def find_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Paths of supported layers that `spec` targets (PEFT's matching rules, `all-linear` included: every
    Linear/Conv1D but the output layer)."""
    if is_all_linear(spec.target_modules):
        skip = output_layer_path(model)
        return [
            p
            for p, m in unwrap(model).items()
            if p and (isinstance(m, nn.Linear) or is_conv1d(m)) and p != skip and not spec.excludes(p)
        ]
    found = [p for p, m in unwrap(model).items() if p and supported_layer(m) and spec.matches(p)]
    if not found:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in unwrap(model).items() if supported_layer(m)})
        raise AdapterError(
            f"targets {spec.target_modules!r} match no Linear/Conv1D/Conv2d module; layer names here: "
            f"{', '.join(names[:12])}"
        )
    return found


def check_fits(model: nn.Module, adapter: Adapter) -> None:
    """Every adapted module exists, is a supported layer, and A/B shapes fit its weight."""
    modules = unwrap(model)
    missing = sorted(p for p in adapter.modules if p not in modules)
    if missing:
        layer_paths = [p for p, m in modules.items() if supported_layer(m)]
        hints = []
        for p in missing[:3]:
            close = difflib.get_close_matches(p, layer_paths, n=2, cutoff=0.5)
            hints.append(f"{p} (closest: {', '.join(close) if close else 'none'})")
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise AdapterError(
            f"adapter {adapter.name} targets {len(missing)} module(s) the model lacks: {'; '.join(hints)}{more}. "
            "Is it an adapter for this base model?"
        )
    for path, lora in sorted(adapter.modules.items()):
        check_module_fits(path, modules[path], lora)


def check_module_fits(path: str, module: nn.Module, lora: ModuleLora) -> None:
    if not supported_layer(module):
        raise AdapterError(f"{path} is a {type(module).__name__}; LoRA supports Linear, Conv1D and Conv2d")
    d_in, d_out = layer_dims(module)
    a_ok = lora.A.shape[1] == d_in and (lora.A.dim() == 4) == isinstance(module, nn.Conv2d)
    if isinstance(module, nn.Conv2d) and a_ok:
        a_ok = tuple(lora.A.shape[2:]) == tuple(module.kernel_size)
    b_ok = lora.B.shape[0] == d_out
    if not (a_ok and b_ok):
        weight = tuple(module.weight.shape)
        raise AdapterError(
            f"{path}: adapter shapes lora_A {tuple(lora.A.shape)}, lora_B {tuple(lora.B.shape)} do not fit "
            f"the model's weight {weight} (in={d_in}, out={d_out}); is it an adapter for this base model?"
        )


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def wrap_modules(model: nn.Module, paths: Iterable[str]) -> dict[str, LoraLayer]:
    """Wrap each path with a `LoraLayer` (idempotent); returns the wrappers by path."""
    layers = {}
    for path in paths:
        mod = model.get_submodule(path)
        if not isinstance(mod, LoraLayer):
            mod = LoraLayer(mod, path)
            _replace(model, path, mod)
        layers[path] = mod
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {m.path: m for m in model.modules() if isinstance(m, LoraLayer)}


def attach_adapter(model: nn.Module, adapter: Adapter) -> dict[str, LoraLayer]:
    """Make `adapter` resident (unmerged: PEFT's forward) on `model`; other wrapped modules get none."""
    check_fits(model, adapter)
    layers = wrap_modules(model, adapter.modules)
    for path, layer in lora_layers(model).items():
        layer.set_lora(adapter.modules.get(path))
    return layers


def attach_feed(model: nn.Module, paths: Iterable[str], feed: BranchFeed) -> dict[str, LoraLayer]:
    """Route the given modules' LoRA branch through `feed` (branched export)."""
    layers = wrap_modules(model, paths)
    for layer in layers.values():
        layer.feed = feed
    return layers


def merge_adapter(model: nn.Module, adapter: Adapter, *, allow_nonfinite: bool = False) -> list[str]:
    """Fold `s·B·A` into the base weights in place (no wrappers left behind)."""
    check_fits(model, adapter)
    modules = unwrap(model)
    for path, lora in sorted(adapter.modules.items()):
        base = modules[path]
        base.weight.data.copy_(merged_weight(base, lora, allow_nonfinite=allow_nonfinite, path=path))
    return sorted(adapter.modules)

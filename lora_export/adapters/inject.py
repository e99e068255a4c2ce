"""Find target modules, check an adapter against a model, wrap modules with `LoraLayer`, merge."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import nn

from lora_export.adapters import validate
from lora_export.adapters.adapter import Adapter, ModuleLora
from lora_export.adapters.layer import (
    BranchFeed,
    LoraLayer,
    is_conv1d,
    layer_dims,
    merged_weight,
    supported_layer,
    wrap_paths,
)
from lora_export.adapters.saved import (
    SavedModule,
    apply_base_layers,
    check_saved_fits,
    copy_saved,
    saved_modules,
    wrap_saved,
)
from lora_export.adapters.spec import DEFAULT_TARGETS, LoraSpec, is_all_linear
from lora_export.adapters.ties import own_weight
from lora_export.errors import AdapterError, named


def unwrap(model: nn.Module) -> dict[str, nn.Module]:
    """Module paths as PEFT names them, looking through our `LoraLayer` and `SavedModule` wrappers."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (LoraLayer, SavedModule)):
            continue
        out[clean_path(name)] = mod
    return out


def clean_path(name: str) -> str:
    """`a.base_layer.b.base_layer` -> `a.b`: a module path without our wrappers' `base_layer` hops."""
    name = name.replace(".base_layer.", ".")
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


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
            f"targets {spec.target_modules!r} match no Linear/Conv1D/Conv2d/Embedding module; layer names here: "
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
            f"{named('adapter', adapter.name)} targets {len(missing)} module(s) the model lacks: "
            f"{'; '.join(hints)}{more}. "
            "Is it an adapter for this base model?"
        )
    check_saved_fits(modules, adapter)  # first: a resized vocabulary explains the LoRA shapes that follow
    for path, lora in sorted(adapter.modules.items()):
        check_module_fits(path, modules[path], lora)
    check_config_targets(model, modules, adapter)


def check_config_targets(model: nn.Module, modules: dict[str, nn.Module], adapter: Adapter) -> None:
    """A PEFT adapter's `target_modules` against this model, as PEFT would apply it (`validate`): `null` means
    the model type's defaults; a targeted layer without tensors is only harmless with `init_lora_weights: true`."""
    where = adapter.extra.get("peft_config")
    if not where:
        return
    validate.check_default_targets(model, adapter, DEFAULT_TARGETS)
    spec = adapter.spec
    if spec.target_modules and not validate.is_all_linear(spec.target_modules):
        targeted = [p for p, m in modules.items() if p and supported_layer(m) and spec.matches(p)]
        validate.check_untargeted(
            spec, adapter.extra.get("init_lora_weights", True), targeted, list(adapter.modules), where
        )


def check_module_fits(path: str, module: nn.Module, lora: ModuleLora) -> None:
    if not supported_layer(module):
        raise AdapterError(
            f"{path} is a {type(module).__name__}; LoRA supports Linear, Conv1D, Conv2d and Embedding layers"
        )
    if lora.embedding and not isinstance(module, nn.Embedding):
        raise AdapterError(
            f"{path}: the adapter holds embedding LoRA (lora_embedding_A/B) but the model's layer is a "
            f"{type(module).__name__}; is it an adapter for this base model?"
        )
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


def wrap_modules(model: nn.Module, paths: Iterable[str]) -> dict[str, LoraLayer]:
    """Wrap each path with a `LoraLayer` (idempotent); returns the wrappers by path."""
    return wrap_paths(model, paths, LoraLayer)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {m.path: m for m in model.modules() if isinstance(m, LoraLayer)}


def attach_adapter(model: nn.Module, adapter: Adapter) -> dict[str, LoraLayer]:
    """Make `adapter` resident (unmerged: PEFT's forward) on `model`; other wrapped modules get none. Base
    weights the adapter saved beside an embedding (`save_embedding_layers`) replace the model's, as PEFT loads
    them."""
    check_fits(model, adapter)
    apply_base_layers(unwrap(model), adapter)
    layers = wrap_modules(model, adapter.modules)
    for path, layer in lora_layers(model).items():
        layer.set_lora(adapter.modules.get(path))
    wrap_saved(model, adapter.saved)
    for path, module in saved_modules(model).items():
        module.set_params(adapter.saved.get(path))
    return layers


def attach_feed(model: nn.Module, paths: Iterable[str], feed: BranchFeed) -> dict[str, LoraLayer]:
    """Route the given modules' LoRA branch through `feed` (branched export)."""
    layers = wrap_modules(model, paths)
    for layer in layers.values():
        layer.feed = feed
    return layers


def merge_adapter(model: nn.Module, adapter: Adapter, *, allow_nonfinite: bool = False) -> list[str]:
    """Fold `s·B·A` (DoRA: `g * (W0 + s·B·A)`) into the base weights and copy `modules_to_save` in (no wrappers
    left behind). Each merged weight becomes a parameter of its own module (`ties.own_weight`), so a weight tied
    to another layer (GPT-2's `lm_head` and `wte`) is untied rather than changed for both: the other layer keeps
    `W0`, as in the unmerged forward."""
    check_fits(model, adapter)
    apply_base_layers(unwrap(model), adapter)
    modules = unwrap(model)
    merged = {
        path: merged_weight(modules[path], lora, allow_nonfinite=allow_nonfinite, path=path)
        for path, lora in sorted(adapter.modules.items())
    }  # all from W0, before any module changes
    for path, value in merged.items():
        own_weight(modules[path], value)
    copy_saved(model, adapter)
    return sorted(adapter.modules)

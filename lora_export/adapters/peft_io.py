"""Read and write adapters: PEFT directories, and contract-layout files (.onnx_adapter, .safetensors, .npz).

A PEFT directory holds `adapter_config.json` + `adapter_model.safetensors` (or a legacy
`adapter_model.bin`, read only with `torch.load(weights_only=True)`). Single files are in the ONNX
name-contract layout (`lora_export.contract.weight_names`: A `[in, r]`, B `[r, out]`, scaling folded), the
layout ONNX Runtime multi-LoRA tools write; names may carry a leading `base_model.model.`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_export.adapters import validate
from lora_export.adapters.adapter import Adapter, ModuleLora
from lora_export.adapters.spec import LoraSpec, is_all_linear, lora_scaling
from lora_export.artifacts.fileio import atomic_dir, sha256_file, sha256_files
from lora_export.contract import (
    PEFT_KEY_HINT,
    PEFT_PREFIX,
    WEIGHT,
    parse_dora,
    parse_peft_base_layer_key,
    parse_peft_embedding_key,
    parse_peft_key,
    parse_peft_magnitude_key,
    parse_saved,
    peft_embedding_names,
    peft_magnitude_name,
    peft_names,
    strip_peft_prefix,
)
from lora_export.errors import AdapterError, named

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CONTRACT_SUFFIXES = (".onnx_adapter", ".safetensors", ".npz")

# Config fields whose non-default values change the math in ways we do not implement.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "bias": ("none", None),
    "lora_bias": (False, None),
    "layer_replication": (None, [], ()),
    "target_parameters": (None, [], ()),
    "trainable_token_indices": (None, {}, []),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []),
    "megatron_config": (None, {}),
    "arrow_config": (None, {}),
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),
    "use_bdlora": (None, False, {}),
}


def read_adapter(source: str | Path, *, name: str | None = None, allow_nonfinite: bool = False) -> Adapter:
    """Read a PEFT adapter directory or a contract-layout file into an `Adapter`.

    Sample names (`sample:e2e/NAME`) are resolved by `models.sources.open_adapter`, not here.
    """
    path = Path(source)
    if not path.exists():
        raise AdapterError(f"{named('adapter', path)} does not exist: give a PEFT adapter directory or an adapter file")
    if path.is_file() and path.name in (SAFETENSORS_NAME, BIN_NAME) and (path.parent / CONFIG_NAME).exists():
        path = path.parent
    if path.is_dir():
        adapter = _read_peft_dir(path)
    elif path.suffix in CONTRACT_SUFFIXES:
        adapter = _read_contract_file(path)
    else:
        raise AdapterError(
            f"{named('adapter', path)}: unknown format; "
            f"expected a PEFT directory or one of {', '.join(CONTRACT_SUFFIXES)}"
        )
    adapter.name = name or path.stem
    if not allow_nonfinite:
        check_finite(adapter)
    return adapter


def check_finite(adapter: Adapter) -> None:
    tensors = [(f"{p}.{label}", t) for p, m in sorted(adapter.modules.items()) for label, t in m.tensors().items()]
    tensors += [(f"{m}.{p}", t) for m, params in sorted(adapter.saved.items()) for p, t in sorted(params.items())]
    for name, t in tensors:
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(
                f"{named('adapter', adapter.source)}: {name} has {bad} NaN/Inf values; fix the adapter or pass "
                "--allow-nonfinite"
            )


def _read_peft_dir(path: Path) -> Adapter:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise AdapterError(
            f"{path} has no {CONFIG_NAME}: expected a PEFT adapter directory ({CONFIG_NAME} + {SAFETENSORS_NAME})"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path} is not valid JSON ({e}): re-save the adapter") from None
    weight_files = [p for p in (path / SAFETENSORS_NAME, path / BIN_NAME) if p.exists()]
    if not weight_files:
        raise AdapterError(f"{path} has no {SAFETENSORS_NAME} (or legacy {BIN_NAME}): the adapter has no weights")
    wpath = weight_files[0]
    raw = _load_safetensors(wpath) if wpath.suffix == ".safetensors" else _load_bin(wpath)
    if isinstance(config, dict):  # the config against its tensors, as PEFT would build and load it
        validate.check_config(config, cfg_path, validate.tensor_ranks(raw))
    spec = spec_from_peft_config(config, cfg_path)
    parts = _split_peft_tensors(raw, wpath, _saved_names(config.get("modules_to_save"), cfg_path))
    modules = _pair_peft_tensors(parts, spec, wpath, use_dora=bool(config.get("use_dora")))
    validate.check_ranks(spec, {p: m.r for p, m in modules.items()}, cfg_path)
    validate.check_targets(spec, sorted(modules), cfg_path)
    extra = {"peft_config": str(cfg_path), "init_lora_weights": config.get("init_lora_weights", True)}
    return Adapter(
        spec=spec,
        modules=modules,
        source=str(path),
        sha256=sha256_files([cfg_path, wpath]),
        saved=parts.saved,
        base_layers=parts.base_layers,
        extra=extra,
    )


def _saved_names(value: Any, where: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise AdapterError(f"{where}: modules_to_save must be a list of module names, got {value!r}")
    return list(value)


def spec_from_peft_config(config: dict[str, Any], where: Path | str = "adapter_config.json") -> LoraSpec:
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: expected a JSON object (PEFT's LoraConfig), got a {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{where}: peft_type is {peft_type!r}; only LORA adapters are supported")
    for key, ok in _UNSUPPORTED.items():
        if key in config and config[key] not in ok:
            raise AdapterError(
                f"{where}: {key}={config[key]!r} is not supported (only {ok[0]!r}); "
                "export this adapter with PEFT or retrain without it"
            )
    targets = config.get("target_modules") or []
    try:
        return _spec(config, targets)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{where}: a field has the wrong type ({e}); compare with PEFT's LoraConfig") from None


def _spec(config: dict[str, Any], targets: list[str] | str) -> LoraSpec:
    return LoraSpec(
        r=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=targets if isinstance(targets, str) else list(targets),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
        exclude_modules=config.get("exclude_modules"),
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterError(
            f"cannot read {path}: truncated or not a safetensors file ({_first_line(e)}); re-save the adapter"
        ) from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(
            f"cannot read {path} as a weights-only torch file ({_first_line(e)}); save it as safetensors"
        ) from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} does not hold a state dict")
    return data


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


@dataclass
class _Parts:
    """An adapter file's tensors, sorted by what they are (module paths without `base_model.model.`)."""

    lora: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # P -> {"A", "B"}
    embedding: set[str] = field(default_factory=set)  # P whose A/B are lora_embedding_A/B
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)  # P -> DoRA m
    scale: dict[str, torch.Tensor] = field(default_factory=dict)  # P -> DoRA g (contract files)
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save
    base_layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # save_embedding_layers


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _saved_module(key: str, names: list[str]) -> tuple[str, str] | None:
    """(module, parameter) when `key` is a parameter of a module named in `modules_to_save`, else None. PEFT
    matches the module path's plain end (`key.endswith(name)`), so `classifier` also saves DistilBERT's
    `pre_classifier`."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        if any(module.endswith(n) for n in names):
            return module, ".".join(parts[i:])
    return None


def _split_peft_tensors(raw: dict[str, torch.Tensor], where: Path, saved_names: list[str]) -> _Parts:
    parts = _Parts()
    for key, t in raw.items():
        if (name := parse_peft_key(key)) is not None:
            parts.lora.setdefault(name.path, {})[name.ab] = _float(t)
        elif (name := parse_peft_embedding_key(key)) is not None:
            parts.lora.setdefault(name.path, {})[name.ab] = _float(t)
            parts.embedding.add(name.path)
        elif (path := parse_peft_magnitude_key(key)) is not None:
            parts.magnitude[path] = _float(t).reshape(-1)  # Conv2d DoRA stores [1, out, 1, 1]
        elif (base := parse_peft_base_layer_key(key)) is not None:
            parts.base_layers.setdefault(base[0], {})[base[1]] = _float(t)
        elif (saved := _saved_module(strip_peft_prefix(key), saved_names)) is not None:
            parts.saved.setdefault(saved[0], {})[saved[1]] = _float(t)
        else:
            raise AdapterError(
                f"{where}: unexpected tensor {key!r}; expected {PEFT_KEY_HINT}, lora_embedding_A/B, "
                "lora_magnitude_vector (DoRA) or parameters of the config's modules_to_save"
            )
    _check_complete(parts, where)
    return parts


def _check_complete(parts: _Parts, where: Path) -> None:
    for path, ab in sorted(parts.lora.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise AdapterError(f"{where}: {path} has no lora_{missing} tensor; the adapter file is incomplete")
    for path in sorted({*parts.magnitude, *parts.scale} - set(parts.lora)):
        raise AdapterError(f"{where}: {path} has a DoRA magnitude but no lora_A/lora_B; the adapter is incomplete")
    for path in sorted(set(parts.base_layers) - set(parts.lora)):
        raise AdapterError(
            f"{where}: {path}.base_layer holds saved base weights but {path} has no LoRA tensors; "
            "the adapter file is incomplete"
        )
    if not parts.lora and not parts.saved:
        raise AdapterError(f"{where} holds no LoRA tensors")


def _pair_peft_tensors(parts: _Parts, spec: LoraSpec, where: Path, *, use_dora: bool) -> dict[str, ModuleLora]:
    modules = {}
    for path, ab in sorted(parts.lora.items()):
        a, b = ab["A"], ab["B"]
        embedding = path in parts.embedding
        if a.dim() not in ((2,) if embedding else (2, 4)) or b.dim() != a.dim():
            kinds = "2-D (Embedding)" if embedding else "2-D (Linear) or 4-D (Conv2d)"
            raise AdapterError(
                f"{where}: {path} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not {kinds} weights"
            )
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{where}: {path} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on the rank"
            )
        magnitude = parts.magnitude.get(path)
        if use_dora and magnitude is None:
            raise AdapterError(f"{where}: use_dora is set but {path} has no lora_magnitude_vector; re-save the adapter")
        if magnitude is not None and magnitude.numel() != b.shape[0]:
            raise AdapterError(
                f"{where}: {path} lora_magnitude_vector has {magnitude.numel()} values for {b.shape[0]} outputs"
            )
        r = int(a.shape[0])
        scaling = lora_scaling(spec.alpha_for(path), r, spec.use_rslora)
        modules[path] = ModuleLora(A=a, B=b, scaling=scaling, embedding=embedding, magnitude=magnitude)
    return modules


def _read_contract_file(path: Path) -> Adapter:
    parts = _split_contract_tensors(_load_contract_arrays(path), path)
    modules = {}
    for p, ab in sorted(parts.lora.items()):
        a, b = ab["A"], ab["B"]  # [in, r], [r, out] with scaling folded
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise AdapterError(
                f"{path}: {p} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [in, r] and [r, out]"
            )
        scale = parts.scale.get(p)
        if scale is not None and scale.numel() != b.shape[1]:
            raise AdapterError(f"{path}: {p} dora_scale has {scale.numel()} values for {b.shape[1]} outputs")
        modules[p] = ModuleLora(A=a.T.contiguous(), B=b.T.contiguous(), scaling=1.0, scale=scale)
    ranks = sorted({m.r for m in modules.values()})
    spec = LoraSpec(r=ranks[-1] if ranks else 0, alpha=float(ranks[-1] if ranks else 0), target_modules=sorted(modules))
    return Adapter(
        spec=spec,
        modules=modules,
        source=str(path),
        sha256=sha256_file(path),
        extra={"scaling_folded": True},
        saved=parts.saved,
    )


def _split_contract_tensors(raw: dict[str, torch.Tensor], where: Path) -> _Parts:
    """Contract names (`lora_export.contract`): A/B, DoRA scales and modules_to_save parameters."""
    parts = _Parts()
    for key, t in raw.items():
        if (name := parse_peft_key(key)) is not None:
            parts.lora.setdefault(name.path, {})[name.ab] = _float(t)
        elif (dora := parse_dora(key)) is not None and dora[1] == WEIGHT:
            parts.scale[dora[0]] = _float(t).reshape(-1)
        elif (saved := parse_saved(key)) is not None and saved[2] == WEIGHT:
            parts.saved.setdefault(saved[0], {})[saved[1]] = _float(t)
        else:
            raise AdapterError(
                f"{where}: unexpected tensor {key!r}; expected {PEFT_KEY_HINT}, .dora_scale.weight or "
                ".modules_to_save. parameters"
            )
    _check_complete(parts, where)
    return parts


def _load_contract_arrays(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        except Exception as e:
            raise AdapterError(f"cannot read {path} as .npz ({_first_line(e)})") from None
    return _load_onnx_adapter(path)


def _load_onnx_adapter(path: Path) -> dict[str, torch.Tensor]:
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = fmt.get_parameters()
    except Exception as e:
        raise AdapterError(f"cannot read {path} as an ONNX Runtime adapter ({_first_line(e)})") from None
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in params.items()}


def write_peft_adapter(adapter: Adapter, out_dir: str | Path, *, base_model: str = "") -> Path:
    """Write `adapter` as a PEFT directory (loads with `PeftModel.from_pretrained`)."""
    from safetensors.torch import save_file

    if adapter.extra.get("scaling_folded"):
        raise AdapterError("this adapter has its scaling folded into B (a contract file); it has no PEFT form")
    spec = adapter.spec
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model or None,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.use_rslora,
        "target_modules": (  # None: PEFT's default targets for the model type
            sorted(adapter.modules) if is_all_linear(spec.target_modules) else (spec.target_modules or None)
        ),
        "rank_pattern": spec.rank_pattern,
        "alpha_pattern": spec.alpha_pattern,
        "fan_in_fan_out": spec.fan_in_fan_out,
        "layers_to_transform": spec.layers_to_transform,
        "layers_pattern": spec.layers_pattern,
        "exclude_modules": spec.exclude_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": adapter.is_dora,
        "modules_to_save": sorted(adapter.saved) or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if any(m.scale is not None and m.magnitude is None for m in adapter.modules.values()):
        raise AdapterError("this adapter holds DoRA scales computed for one graph, not magnitudes; it has no PEFT form")
    tensors = {}
    for path, m in sorted(adapter.modules.items()):
        a_name, b_name = peft_embedding_names(path) if m.embedding else peft_names(path)
        tensors[a_name], tensors[b_name] = m.A.contiguous(), m.B.contiguous()
        if m.magnitude is not None:
            tensors[peft_magnitude_name(path)] = m.magnitude.contiguous()
    for module, params in sorted(adapter.saved.items()):
        for param, value in sorted(params.items()):
            tensors[f"{PEFT_PREFIX}{module}.{param}"] = value.contiguous()
    for module, params in sorted(adapter.base_layers.items()):
        for param, value in sorted(params.items()):
            tensors[f"{PEFT_PREFIX}{module}.base_layer.{param}"] = value.contiguous()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, replaceable=(CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, "README.md")) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
    return out_dir

"""Read and write adapters: PEFT directories, and contract-layout files (.onnx_adapter, .safetensors, .npz).

A PEFT directory holds `adapter_config.json` + `adapter_model.safetensors` (or a legacy
`adapter_model.bin`, read only with `torch.load(weights_only=True)`). Single files are in the ONNX
name-contract layout (`lora_export.contract.weight_names`: A `[in, r]`, B `[r, out]`, scaling folded), the
layout ONNX Runtime multi-LoRA tools write; names may carry a leading `base_model.model.`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_export.adapters.adapter import Adapter, ModuleLora
from lora_export.adapters.spec import LoraSpec, lora_scaling
from lora_export.contract import PEFT_KEY_HINT, parse_peft_key, peft_names
from lora_export.errors import AdapterError
from lora_export.fileio import atomic_dir, sha256_file, sha256_files

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CONTRACT_SUFFIXES = (".onnx_adapter", ".safetensors", ".npz")

# Config fields whose non-default values change the math in ways we do not implement.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, [], ()),
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
    """Read a PEFT adapter directory or a contract-layout file into an `Adapter`."""
    path = Path(source)
    if not path.exists():
        raise AdapterError(f"adapter {path} does not exist: give a PEFT adapter directory or an adapter file")
    if path.is_file() and path.name in (SAFETENSORS_NAME, BIN_NAME) and (path.parent / CONFIG_NAME).exists():
        path = path.parent
    if path.is_dir():
        adapter = _read_peft_dir(path)
    elif path.suffix in CONTRACT_SUFFIXES:
        adapter = _read_contract_file(path)
    else:
        raise AdapterError(
            f"adapter {path}: unknown format; expected a PEFT directory or one of {', '.join(CONTRACT_SUFFIXES)}"
        )
    adapter.name = name or path.stem
    if not allow_nonfinite:
        check_finite(adapter)
    return adapter


def check_finite(adapter: Adapter) -> None:
    for p, m in sorted(adapter.modules.items()):
        for label, t in (("lora_A", m.A), ("lora_B", m.B)):
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise AdapterError(
                    f"adapter {adapter.source}: {p}.{label} has {bad} NaN/Inf values; "
                    "fix the adapter or pass --allow-nonfinite"
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
    spec = spec_from_peft_config(config, cfg_path)
    weight_files = [p for p in (path / SAFETENSORS_NAME, path / BIN_NAME) if p.exists()]
    if not weight_files:
        raise AdapterError(f"{path} has no {SAFETENSORS_NAME} (or legacy {BIN_NAME}): the adapter has no weights")
    wpath = weight_files[0]
    raw = _load_safetensors(wpath) if wpath.suffix == ".safetensors" else _load_bin(wpath)
    modules = _pair_peft_tensors(raw, spec, wpath)
    return Adapter(spec=spec, modules=modules, source=str(path), sha256=sha256_files([cfg_path, wpath]))


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


def _split_key(key: str, where: Path) -> tuple[str, str]:
    parsed = parse_peft_key(key)
    if parsed is None:
        if "lora_embedding" in key:
            raise AdapterError(f"{where}: {key} is an embedding adapter; only Linear/Conv1D/Conv2d are supported")
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"{where}: {key} is a DoRA magnitude (use_dora); DoRA is not supported")
        raise AdapterError(f"{where}: unexpected tensor {key!r}; expected {PEFT_KEY_HINT}")
    return parsed.path, parsed.ab


def _pairs(raw: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        path, ab = _split_key(key, where)
        pairs.setdefault(path, {})[ab] = t.detach().to(torch.float32).contiguous()
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise AdapterError(f"{where}: {path} has no lora_{missing}.weight; the adapter file is incomplete")
    if not pairs:
        raise AdapterError(f"{where} holds no LoRA tensors")
    return pairs


def _pair_peft_tensors(raw: dict[str, torch.Tensor], spec: LoraSpec, where: Path) -> dict[str, ModuleLora]:
    modules = {}
    for path, ab in sorted(_pairs(raw, where).items()):
        a, b = ab["A"], ab["B"]
        if a.dim() not in (2, 4) or b.dim() != a.dim():
            raise AdapterError(
                f"{where}: {path} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not 2-D (Linear) "
                "or 4-D (Conv2d) weights"
            )
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{where}: {path} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on the rank"
            )
        r = int(a.shape[0])
        modules[path] = ModuleLora(A=a, B=b, scaling=lora_scaling(spec.alpha_for(path), r, spec.use_rslora))
    return modules


def _read_contract_file(path: Path) -> Adapter:
    raw = _load_contract_arrays(path)
    modules = {}
    for p, ab in sorted(_pairs(raw, path).items()):
        a, b = ab["A"], ab["B"]  # [in, r], [r, out] with scaling folded
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise AdapterError(
                f"{path}: {p} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [in, r] and [r, out]"
            )
        modules[p] = ModuleLora(A=a.T.contiguous(), B=b.T.contiguous(), scaling=1.0)
    ranks = sorted({m.r for m in modules.values()})
    spec = LoraSpec(r=ranks[-1] if ranks else 0, alpha=float(ranks[-1] if ranks else 0), target_modules=sorted(modules))
    return Adapter(
        spec=spec, modules=modules, source=str(path), sha256=sha256_file(path), extra={"scaling_folded": True}
    )


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
        "target_modules": spec.target_modules,
        "rank_pattern": spec.rank_pattern,
        "alpha_pattern": spec.alpha_pattern,
        "fan_in_fan_out": spec.fan_in_fan_out,
        "layers_to_transform": spec.layers_to_transform,
        "layers_pattern": spec.layers_pattern,
        "exclude_modules": spec.exclude_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for path, m in sorted(adapter.modules.items()):
        a_name, b_name = peft_names(path)
        tensors[a_name], tensors[b_name] = m.A.contiguous(), m.B.contiguous()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, replaceable=(CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, "README.md")) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
    return out_dir

"""An adapter's config checked against its tensors, with PEFT's semantics as the reference.

PEFT builds each LoRA layer from `adapter_config.json` (rank `r` or its `rank_pattern` entry, scaling
`lora_alpha / r`, the modules `target_modules` selects) and then loads the tensors into it. So a config that
contradicts its tensors is a broken adapter: PEFT either refuses it or computes something else than the
tensors say. Each contradiction is refused here with one line naming the field, the config's value and the
tensors' value. What PEFT loads and computes deterministically is accepted as PEFT does:

- `r`: a positive integer equal to every module's tensor rank (or its `rank_pattern` entry). `0`, `-4`,
  `8.5`, `"8"` are refused (PEFT raises on them); a wrong rank (`100000`) too (PEFT cannot load the tensors).
- `lora_alpha` and `alpha_pattern` values: finite numbers; negative ones are fine (PEFT scales by them).
  `alpha_pattern` without `rank_pattern` is fine (the scaling of those modules changes, as in PEFT).
- `target_modules`: `[]` is refused (PEFT: no target modules); a list or regex that leaves out a module the
  tensors adapt is refused (PEFT would silently skip those tensors); `null` means PEFT's default targets for
  the model type, checked once the model is known (`check_default_targets`). A targeted module without
  tensors is accepted only with `init_lora_weights: true` (PEFT then starts it at B = 0: no effect).
- `init_lora_weights`: `true`, `false`, `"gaussian"`, `"orthogonal"`, `"eva"`, `"mica"` only say how training
  started; the saved adapter is plain LoRA. PiSSA (`"pissa"`, `"pissa_niter_N"`), OLoRA, CorDA and LoRA-GA
  adapters are relative to PEFT's residual base weights, LoftQ's to a quantized base: refused, with PEFT's
  conversion step named.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lora_export.errors import AdapterError

PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")
RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga")  # prefixes: pissa_niter_N too
CONVERT_STEP = (
    "convert it to plain LoRA with PEFT first: peft_model.save_pretrained(OUT, "
    "path_initial_model_for_weight_conversion=INITIAL), INITIAL being the adapter saved before training"
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ranks_text(ranks: dict[str, int]) -> str:
    values = sorted(set(ranks.values()))
    return f"rank {values[0]}" if len(values) == 1 else f"ranks {', '.join(map(str, values))}"


def _modules_text(paths: list[str]) -> str:
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    return f"{paths[0]}{more}"


def tensor_ranks(raw: dict[str, Any]) -> dict[str, int]:
    """Module path -> rank, from the `lora_A` tensors of a PEFT state dict (rank = A's first dimension)."""
    from lora_export.contract import parse_peft_key

    out = {}
    for key, t in raw.items():
        name = parse_peft_key(key)
        if name is not None and name.ab == "A" and getattr(t, "dim", lambda: 0)() >= 1:
            out[name.path] = int(t.shape[0])
    return out


def check_config(config: dict[str, Any], where: Path | str, ranks: dict[str, int]) -> None:
    """The fields PEFT needs to rebuild the layers, against the tensors' ranks (`ranks`: module path -> rank)."""
    have = _ranks_text(ranks) if ranks else "no LoRA tensors"
    r = config.get("r", 8)
    if not _is_int(r) or r <= 0:
        kind = f"a {type(r).__name__}, not an integer" if not _is_int(r) else "not a positive integer"
        fix = f'set "r": {sorted(set(ranks.values()))[-1]}' if ranks else "set r to the adapter's rank"
        raise AdapterError(f"{where}: r={r!r} is {kind} (PEFT refuses it), while the tensors have {have}: {fix}")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for field, value in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(value, dict):
            raise AdapterError(f"{where}: {field}={value!r} must be an object (module pattern -> value)")
    for key, value in rank_pattern.items():
        if not _is_int(value) or value <= 0:
            raise AdapterError(
                f"{where}: rank_pattern[{key!r}]={value!r} is not a positive integer (PEFT refuses it), while the "
                f"tensors have {have}"
            )
    alpha = config.get("lora_alpha", 8)
    for field, value in (("lora_alpha", alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in alpha_pattern.items())):
        if not _is_number(value) or not math.isfinite(value):
            raise AdapterError(
                f"{where}: {field}={value!r} is not a finite number, so every scaling {field.split('[')[0]}/r would "
                "be too: set the alpha the adapter was trained with"
            )
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{where}: use_rslora={config['use_rslora']!r} must be true or false")
    targets = config.get("target_modules")
    if targets is not None:
        if not isinstance(targets, (str, list)) or (
            isinstance(targets, list) and not all(isinstance(t, str) for t in targets)
        ):
            raise AdapterError(f"{where}: target_modules={targets!r} must be a list of module names or a regex")
        if not targets:
            paths = sorted(ranks)
            hint = f", while the tensors adapt {_modules_text(paths)}" if paths else ""
            raise AdapterError(f"{where}: target_modules={targets!r} selects no module (PEFT refuses it){hint}")
    check_init(config.get("init_lora_weights", True), where)


def check_init(init: Any, where: Path | str) -> None:
    """Refuse `init_lora_weights` values whose saved adapter is not relative to the original base weights."""
    if init in PLAIN_INITS and (isinstance(init, str) or isinstance(init, bool)):
        return
    text = str(init).lower()
    if isinstance(init, str) and text.startswith(RESIDUAL_INITS):
        raise AdapterError(
            f"{where}: init_lora_weights={init!r}: this adapter is relative to PEFT's residual base weights, not the "
            f"model's; {CONVERT_STEP}"
        )
    if text == "loftq":
        raise AdapterError(
            f"{where}: init_lora_weights='loftq': this adapter is relative to LoftQ's quantized base weights; "
            "merge it with PEFT (merge_and_unload) and export the merged model without --adapter"
        )
    raise AdapterError(
        f"{where}: init_lora_weights={init!r} is not a value PEFT knows (true, false, 'gaussian', 'orthogonal', "
        "'eva', 'mica', 'pissa', 'olora', 'corda', 'lora_ga', 'loftq')"
    )


def check_ranks(spec, ranks: dict[str, int], where: Path | str) -> None:
    """Every module's tensor rank is the rank PEFT builds its layer with (`r` or a `rank_pattern` entry)."""
    from lora_export.adapters.spec import pattern_key

    for path, rank in sorted(ranks.items()):
        want = spec.rank_for(path)
        if want != rank:
            key = pattern_key(spec.rank_pattern, path)
            field = f"rank_pattern[{key!r}]" if key is not None else "r"
            raise AdapterError(
                f"{where}: {field}={want} but the tensors of {path} have rank {rank} (PEFT cannot load them): "
                f"set {field} to {rank}"
            )


def check_targets(spec, paths: list[str], where: Path | str, field: str | None = None) -> None:
    """Every module with tensors is selected by `target_modules` (PEFT would skip the others' tensors)."""
    if is_all_linear(spec.target_modules) or not spec.target_modules:
        return
    left_out = sorted(p for p in paths if not spec.matches(p))
    if left_out:
        names = sorted({p.rsplit(".", 1)[-1] for p in left_out})
        targets = spec.target_modules
        if isinstance(targets, str):
            fix = ": make the regex match those full module paths (PEFT matches the whole path)"
        elif all(n in targets for n in names):
            fields = {"layers_to_transform": spec.layers_to_transform, "exclude_modules": spec.exclude_modules}
            set_ = ", ".join(f"{k}={v!r}" for k, v in fields.items() if v not in (None, []))
            fix = f": {set_} leaves them out; fix that field, or drop those tensors"
        else:
            fix = f": add {', '.join(map(repr, names))} to target_modules (or drop those tensors)"
        field = field or f"target_modules={spec.target_modules!r}"
        raise AdapterError(
            f"{where}: {field} does not select {_modules_text(left_out)}, which the tensors adapt (PEFT would leave "
            f"those tensors out){fix}"
        )


def check_default_targets(model, adapter, default_targets: dict[str, list[str]]) -> None:
    """`target_modules: null`: PEFT takes the model type's default targets; the tensors must be among them."""
    if adapter.spec.target_modules or not adapter.extra.get("peft_config"):
        return
    where = adapter.extra["peft_config"]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in default_targets:
        raise AdapterError(
            f"{where}: target_modules is null and PEFT has no default targets for model type {model_type!r}: "
            "list the adapted modules in target_modules"
        )
    from dataclasses import replace

    defaults = list(default_targets[model_type])
    field = f"target_modules=null (PEFT's defaults for {model_type}: {defaults!r})"
    check_targets(replace(adapter.spec, target_modules=defaults), sorted(adapter.modules), where, field)


def check_untargeted(spec, init: Any, targeted: list[str], paths: list[str], where: Path | str) -> None:
    """Modules `target_modules` selects but the tensors leave out: PEFT starts them from `init_lora_weights`,
    which is no change only for `true` (B = 0)."""
    missing = sorted(set(targeted) - set(paths))
    if missing and init is not True:
        raise AdapterError(
            f"{where}: target_modules selects {_modules_text(missing)} but the adapter has no tensors for it, and "
            f"init_lora_weights={init!r} makes PEFT start it at random: re-save the adapter"
        )


def is_all_linear(targets) -> bool:
    """PEFT's `target_modules="all-linear"` shorthand (also as the only item of a list)."""
    items = [targets] if isinstance(targets, str) else list(targets or [])
    return len(items) == 1 and isinstance(items[0], str) and items[0].lower() == "all-linear"


def check_finite_alpha(alpha: Any, flag: str = "--alpha") -> float:
    """A user-given alpha (`make-adapter --alpha`): a finite number, or a one-line error naming `flag`."""
    if not _is_number(alpha) or not math.isfinite(alpha):
        raise AdapterError(f"{flag} {alpha!r}: lora_alpha must be a finite number (the scaling is alpha / r)")
    return float(alpha)

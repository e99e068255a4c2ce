"""The LoRA spec: which modules get an adapter, with what rank and scaling (PEFT's semantics)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lora_export.errors import UserError

# Default targets for architectures PEFT has none for (its `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`
# comes first when PEFT is installed), and PEFT's own for the common ones so they hold without it: the paper's Wq, Wv.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "opt": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],  # fused q/k/v
    "distilbert": ["q_lin", "v_lin"],
}
# Otherwise the first of these whose layers the model has (the query/value projections under their usual names).
COMMON_TARGETS = (["q_proj", "v_proj"], ["query", "value"], ["q_lin", "v_lin"], ["qkv_proj"], ["c_attn"])


def peft_default_targets() -> dict[str, list[str]]:
    """PEFT's default LoRA targets per `model_type`, or {} when PEFT is not installed (it is optional)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        return {}
    return {k: list(v) for k, v in mapping.items() if v}


def default_targets(arch: str, fix: str = "pass --targets NAMES", module=None) -> list[str]:
    """The architecture's default target modules: PEFT's, else ours, else (given the model `module`) the first
    common query/value naming its layers use. For none, a one-line error that ends with `fix` (what the
    caller's user can pass instead)."""
    targets = peft_default_targets().get(arch) or DEFAULT_TARGETS.get(arch)
    if not targets and module is not None:
        leaves = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if type(m).__name__ == "Linear"}
        targets = next((t for t in COMMON_TARGETS if set(t) <= leaves), None)
    if not targets:
        raise UserError(f"no default LoRA targets for {arch!r}: {fix}")
    return list(targets)


ALL_LINEAR = "all-linear"


def is_all_linear(targets: list[str] | str) -> bool:
    """PEFT's `target_modules="all-linear"` shorthand (also as the only item of a list, as `--targets` gives it)."""
    items = [targets] if isinstance(targets, str) else list(targets)
    return len(items) == 1 and isinstance(items[0], str) and items[0].lower() == ALL_LINEAR


def pattern_key(patterns: dict[str, Any], path: str) -> str | None:
    """The key of `patterns` that matches module `path`, as PEFT's `get_pattern_key`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    if r <= 0:
        return 0.0
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoraSpec:
    """What PEFT's `LoraConfig` says about shapes and scaling (the fields we support)."""

    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    target_modules: list[str] | str = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    def rank_for(self, path: str) -> int:
        key = pattern_key(self.rank_pattern, path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        key = pattern_key(self.alpha_pattern, path)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scaling_for(self, path: str, r: int | None = None) -> float:
        return lora_scaling(self.alpha_for(path), self.rank_for(path) if r is None else r, self.use_rslora)

    def matches(self, path: str) -> bool:
        """Whether module `path` is a target, following PEFT's `check_target_module_exists`."""
        if self.excludes(path):
            return False
        targets = self.target_modules
        if isinstance(targets, str):
            return re.fullmatch(targets, path) is not None
        if path in targets:  # an exact module path: PEFT skips the layer filter for it
            return True
        if not any(path.endswith(f".{t}") for t in targets):
            return False
        return self._layer_selected(path)

    def excludes(self, path: str) -> bool:
        """Whether `exclude_modules` leaves module `path` out."""
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, path) is not None
        return any(path == e or path.endswith(f".{e}") for e in ex)

    def _layer_selected(self, path: str) -> bool:
        layers = self.layers_to_transform
        if layers is None or (isinstance(layers, list) and not layers):
            return True
        patterns = self.layers_pattern
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            for pat in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", path)
                if match:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

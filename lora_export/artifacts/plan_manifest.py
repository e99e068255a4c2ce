"""`OUT.plan.json`: what a built engine is, and which adapter it holds now.

It records the TensorRT version, the optimization profiles, the flags, the refittable weight names and
the source graph's sha256, plus what a later refit needs: how LoRA was built in (`lora_as`, `lora_rank`,
`lora_modules`), where the base weights live (`base_graph`), and the current adapter with the weights it
changed (so the next refit can restore them: a refit only replaces the weights it is given).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lora_export.artifacts.fileio import manifest_path, read_json, write_json
from lora_export.errors import UserError

FORMAT = 1


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class PlanManifest:
    tensorrt: str
    source: dict[str, Any]  # {"path", "sha256", "kind", "precision"}
    profiles: list[dict] = field(default_factory=list)  # InputProfile.to_dict()
    flags: dict[str, Any] = field(default_factory=dict)  # FlagChoice.to_dict() + workspace, timing cache
    refittable: bool = False
    refittable_weights: list[str] = field(default_factory=list)
    io: dict[str, list[dict]] = field(default_factory=dict)  # {"inputs": [...], "outputs": [...]}
    lora_as: str | None = None  # None (merged/base), "inputs" or "weights"
    lora_rank: int | None = None
    lora_modules: list[dict] = field(default_factory=list)
    weights_dtype: str | None = None
    base_graph: dict[str, str] | None = None  # {"path", "sha256"}: where merged refits read W0
    current_adapter: dict[str, Any] | None = None  # {"name", "source", "sha256", "weights": [...] | None}
    build_seconds: float | None = None
    refits: list[dict] = field(default_factory=list)
    created: str = field(default_factory=now)
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanManifest:
        if data.get("format", FORMAT) > FORMAT:
            raise UserError(f"plan manifest format {data['format']} is newer than this lora-export understands")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, plan: str | Path) -> Path:
        path = manifest_path(plan)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, plan: str | Path) -> PlanManifest:
        path = manifest_path(plan)
        if not path.exists():
            raise UserError(f"{path} not found: refit needs the manifest build-engine wrote beside the plan")
        return cls.from_dict(read_json(path))

    @property
    def current_weights(self) -> list[str] | None:
        """Weights the current adapter changed; [] for the base model, None when not known yet."""
        if self.current_adapter is None:
            return []
        return self.current_adapter.get("weights")

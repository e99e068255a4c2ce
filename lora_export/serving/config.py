"""`ServeConfig`: everything `lora-export serve` was asked for, checked before Ray starts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_export.artifacts.decoder_folder import read_folder
from lora_export.errors import UserError
from lora_export.models.sources import adapter_path


@dataclass
class ServeConfig:
    folder: str  # a decoder folder (export-decoder): model.onnx + genai_config.json
    adapters: dict[str, str] = field(default_factory=dict)  # name -> path, loaded at start
    model_name: str | None = None  # the base model's name in the API; default: the folder's name
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_replicas_per_node: int | None = None
    proxy_location: str | None = None  # Ray Serve's: "EveryNode" (its default) or "HeadOnly"
    max_batch_size: int = 32
    batch_wait_ms: float = 10.0
    address: str | None = None  # join this Ray cluster instead of starting one
    api_key: str | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads per replica (default: ORT's)
    cpus_per_replica: float = 1.0  # Ray resources a replica asks for
    folder_adapters: bool = True  # also serve the folder's adapters/NAME.onnx_adapter as NAME
    app_name: str = "lora-export"
    step_delay_ms: float = 0.0  # drills only: every decode step takes at least this long (see serving.model)
    max_request_bytes: int = 4 * 2**20  # a bigger body is answered 413 before it is read whole
    allow_runtime_adapters: bool = False  # POST /v1/load_lora_adapter and unload (vLLM's opt-in)
    adapter_root: str | None = None  # runtime loads only from paths inside this directory
    adapter_dirs: list[str] = field(default_factory=list)  # every adapter under these, registered, loaded lazily
    max_cpu_adapters: int | None = None  # adapters a replica keeps loaded (LRU); None: every one it has used
    max_adapters_per_batch: int | None = None  # distinct adapters in one batch (bank folders)
    # --adapter-dir's registry, scanned once (start-up asks for it several times; it travels to the replicas)
    _registered: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.folder = str(Path(self.folder).resolve())
        self.adapters = {n: str(adapter_path(p).resolve()) for n, p in self.adapters.items()}  # sample: names too
        self.adapter_dirs = [str(Path(d).resolve()) for d in self.adapter_dirs]
        self.adapter_root = str(Path(self.adapter_root).resolve()) if self.adapter_root else None
        if self.model_name is None:
            self.model_name = Path(self.folder).name
        if self.address is None:
            self.address = os.environ.get("RAY_ADDRESS") or None

    def check(self) -> None:
        """One-line errors for what can be checked without Ray: the folder, the numbers, the names."""
        read_folder(self.folder)  # a decoder folder: genai_config.json, the graph it names
        for name, value in (("replicas", self.replicas), ("max-batch-size", self.max_batch_size)):
            if value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")
        if self.step_delay_ms < 0:
            raise UserError(f"--debug-step-delay-ms must be 0 or more, got {self.step_delay_ms}")
        if self.batch_wait_ms < 0:
            raise UserError(f"--batch-wait-ms must be 0 or more, got {self.batch_wait_ms}")
        for name, value in (
            ("max-cpu-adapters", self.max_cpu_adapters),
            ("max-adapters-per-batch", self.max_adapters_per_batch),
        ):
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")
        if self.max_request_bytes < 1024:
            raise UserError(f"--max-request-bytes must be at least 1024, got {self.max_request_bytes}")
        if self.proxy_location not in (None, "EveryNode", "HeadOnly"):
            raise UserError(f"--proxy-location must be EveryNode or HeadOnly, got {self.proxy_location!r}")
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be 1..65535, got {self.port}")
        for name, path in self.served_adapters().items():
            if name == self.model_name:
                raise UserError(f"adapter name {name!r} is the base model's name: pick another name")
            if not Path(path).exists():
                raise UserError(f"adapter {name!r}: {path} does not exist")

    def served_adapters(self) -> dict[str, str]:
        """The adapters served from the start: the folder's own (unless turned off), those registered from
        --adapter-dir, then --adapter ones (a later source wins a name)."""
        from lora_export.serving.model import folder_adapters

        own = folder_adapters(self.folder) if self.folder_adapters else {}
        return {**own, **self.registered_adapters(), **self.adapters}

    def checked_at_start(self) -> dict[str, str]:
        """The adapters loaded once at start-up (a broken one stops `serve`): all but --adapter-dir's, which
        are only registered (checked on disk) and loaded when first asked for."""
        registered = self.registered_adapters()
        return {n: p for n, p in self.served_adapters().items() if registered.get(n) != p}

    def registered_adapters(self) -> dict[str, str]:
        """NAME -> path for every PEFT adapter directory (adapter_config.json) and `.onnx_adapter` file directly
        under each --adapter-dir, scanned on first use; a broken entry is refused in one line."""
        if self._registered is None:
            self._registered = self._scan_adapter_dirs()
        return dict(self._registered)

    def _scan_adapter_dirs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for root in map(Path, self.adapter_dirs):
            if not root.is_dir():
                raise UserError(f"--adapter-dir {root} is not a directory: give a folder of adapter directories")
            for entry in sorted(root.iterdir()):
                if entry.is_dir() and (entry / "adapter_config.json").is_file():
                    _check_registered(entry)
                    out[entry.name] = str(entry)
                elif entry.suffix == ".onnx_adapter":
                    out[entry.stem] = str(entry)
        return out

    def context_length(self) -> int:
        return read_folder(self.folder).facts.context_length


def _check_registered(entry: Path) -> None:
    """A registered PEFT directory is readable as one: its config is a JSON object with a rank, its weights
    exist (the tensors themselves are read when the adapter is first used)."""
    try:
        config = json.loads((entry / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--adapter-dir: {entry.name}/adapter_config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict) or "r" not in config:
        raise UserError(f"--adapter-dir: {entry.name}/adapter_config.json is not a LoRA config (no 'r')")
    if not any((entry / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(f"--adapter-dir: {entry.name} has no adapter_model.safetensors")


def parse_adapter_option(values: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`--adapter NAME=PATH` (repeatable); a bare PATH is named after its file or folder."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name.split(".")[0], value
        if not name or not path:
            raise UserError(f"--adapter {value!r}: write NAME=PATH")
        if name in out:
            raise UserError(f"--adapter names {name!r} twice: give each adapter its own name")
        out[name] = path
    return out

"""Where a streamed export reads the weights from, one tensor at a time.

- `ModuleWeights`: the parameters and buffers of a model already in memory (a read is the tensor itself,
  no copy); `RebuiltWeights`: the same for a model built on the first read;
- `SafetensorsWeights`: a transformers directory's `model.safetensors` (or the shards named by
  `model.safetensors.index.json`). Each read is a `pread` of that tensor's bytes (safetensors' own reader):
  the memory-mapped reader would keep every page it touched mapped, and counted as resident, until the
  file is closed, i.e. the whole model by the end of an export.

Every source counts its reads (`reads`), so tests can prove that an export reads each tensor once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lora_export.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightSource:
    """Named tensors, read one at a time; `reads[name]` counts the reads."""

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()

    def keys(self) -> set[str]:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` as a CPU tensor in its stored dtype."""
        self.reads[name] += 1
        return self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class ModuleWeights(WeightSource):
    """The tensors of an in-memory module, by every name they have (tied parameters under each name)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._tensors = dict(module.named_parameters(remove_duplicate=False))
        self._tensors.update(module.named_buffers(remove_duplicate=False))

    def keys(self) -> set[str]:
        return set(self._tensors)

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


class RebuiltWeights(ModuleWeights):
    """The tensors of a model built on the first read (`rebuild`); names known before, from its skeleton."""

    def __init__(self, skeleton: nn.Module, rebuild: Callable[[], nn.Module]):
        WeightSource.__init__(self)
        self._names = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)}
        self._names.update(n for n, _ in skeleton.named_buffers(remove_duplicate=False))
        self._rebuild = rebuild

    def keys(self) -> set[str]:
        return self._names

    def _read(self, name: str) -> torch.Tensor:
        if self._rebuild is not None:
            ModuleWeights.__init__(self, self._rebuild())
            self._rebuild = None
        return super()._read(name)


class SafetensorsWeights(WeightSource):
    """The tensors of a transformers checkpoint directory, read from its safetensors file(s)."""

    def __init__(self, directory: str | Path):
        super().__init__()
        self.directory = Path(directory)
        self._file_of = checkpoint_files(self.directory)
        if self._file_of is None:
            raise UserError(f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}: save the model with safetensors")

    def keys(self) -> set[str]:
        return set(self._file_of)

    def _read(self, name: str) -> torch.Tensor:
        return read_tensor(self._file_of[name], name)


def checkpoint_files(directory: Path) -> dict[str, Path] | None:
    """`{tensor name: file}` of a safetensors checkpoint directory (single file or sharded), else None."""
    from safetensors import safe_open

    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise UserError(f"{index} is not a safetensors index ({e}): re-save the model") from None
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor from a safetensors file, read with `pread`; a safetensors without that reader (< 0.8)
    memory-maps the file for this one read, and the tensor is copied out before the map is closed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", backend="pread") as f:
            return f.get_tensor(name)
    except TypeError:  # pragma: no cover - older safetensors
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name).clone()

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

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape of `name` without reading it (None: not known before the read)."""
        return None

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
        self._shapes: dict[str, tuple[int, ...]] | None = None
        if self._file_of is None:
            raise UserError(f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}: save the model with safetensors")

    def keys(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """From the file headers (read once, a few KB each)."""
        if self._shapes is None:
            self._shapes = {}
            for file in sorted(set(self._file_of.values())):
                self._shapes.update(_header(file))
        return self._shapes.get(name)

    def _read(self, name: str) -> torch.Tensor:
        return read_tensor(self._file_of[name], name)


def checkpoint_files(directory: Path) -> dict[str, Path] | None:
    """`{tensor name: file}` of a safetensors checkpoint directory (single file or sharded), else None.

    Every file's header is read now (a few KB each), so a missing, truncated or mismatched shard is refused
    before any work rather than halfway through writing a graph."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: directory / file for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is not a safetensors index ({e}): re-save the model") from None
        for file in sorted(set(files.values())):
            missing = sorted(n for n, f in files.items() if f == file and n not in _header_names(file))
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(
                    f"{file} lacks {missing[0]}{more} that {INDEX_FILE} places there: the checkpoint is "
                    "incomplete, re-save it"
                )
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return dict.fromkeys(_header_names(single), single)
    return None


def _header_names(path: Path) -> set[str]:
    return set(_header(path))


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """`{tensor name: shape}` from a safetensors file's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError for a missing file
        raise _damaged(path, e) from None


def _damaged(path: Path, e: Exception) -> UserError:
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return UserError(f"cannot read {path} ({first}): the checkpoint file is damaged or missing, re-save the model")


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor from a safetensors file, read with `pread`; a safetensors without that reader (< 0.8)
    memory-maps the file for this one read, and the tensor is copied out before the map is closed."""
    from safetensors import safe_open

    try:
        try:
            with safe_open(str(path), framework="pt", backend="pread") as f:
                return f.get_tensor(name)
        except TypeError:  # pragma: no cover - older safetensors
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name).clone()
    except Exception as e:  # the file changed or broke since its header was checked
        raise _damaged(path, e) from None

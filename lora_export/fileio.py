"""Atomic writes, hashes and JSON sidecar manifests shared by every stage that writes a file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_export.errors import UserError


def check_output_path(path: str | os.PathLike, force: bool, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse to overwrite an existing file unless `force`, or a suffix not in `suffixes`; then make sure
    the parent folder exists (only once the path is known to be acceptable)."""
    path = Path(path)
    if suffixes and path.suffix not in suffixes:
        raise UserError(f"{path}: unknown file type {path.suffix or '(none)'}; use one of {', '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{path} is a directory: give a file path")
    if path.exists() and not force:
        raise UserError(f"{path} already exists: pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) files; give the result the usual umask-based mode so a
    serving process running as another user can read it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failed write leaves nothing behind (not even the temp file).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish_mode(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replaceable: tuple[str, ...] = ()) -> Iterator[Path]:
    """Like `atomic_path` for a directory: build it beside `path`, then swap it in.

    An existing `path` is replaced only if it is empty or holds nothing but files named in `replaceable`
    (a previous output of the same kind); anything else is refused, never deleted.
    """
    path = Path(path)
    if path.exists():
        foreign = [p.name for p in path.iterdir() if p.name not in replaceable] if path.is_dir() else [path.name]
        if foreign:
            raise UserError(
                f"{path} exists and holds other files ({', '.join(sorted(foreign)[:3])}): choose a new directory"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            _publish_mode(f, directory=f.is_dir())
        _publish_mode(tmp, directory=True)
        old = None
        if path.exists():  # move the old one aside first: at every moment one complete directory exists
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One hash over several files (an adapter directory), in name order."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def manifest_path(artifact: str | os.PathLike) -> Path:
    return Path(str(artifact) + ".json")


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    path = Path(path)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")

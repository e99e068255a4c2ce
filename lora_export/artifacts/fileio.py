"""Atomic writes, hashes and JSON sidecar manifests shared by every stage that writes a file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_export.errors import UserError

_IO_ADVICE = {
    errno.EROFS: "the file system is read-only: write to a directory on a writable disk",
    errno.EACCES: "no permission: choose a directory you can write to, or fix its permissions",
    errno.EPERM: "the operation is not permitted there (an immutable or protected file?): choose another path",
    errno.ENOSPC: "the disk is full: free some space or write to another disk",
    errno.EDQUOT: "the disk quota is exceeded: free some space or write to another disk",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "the path is a directory: give a file path",
    errno.ENOENT: "a directory on the way does not exist or was removed: check the path",
}


def io_error_line(e: OSError, path: str | os.PathLike | None = None, action: str = "write") -> str:
    """One line for a failed file operation: what failed, on which path, what to do."""
    where = path if path is not None else (e.filename or "a file")
    reason = e.strerror or type(e).__name__
    advice = _IO_ADVICE.get(e.errno, "check the path and the disk")
    return f"cannot {action} {where}: {reason} [errno {e.errno}]; {advice}"


@contextlib.contextmanager
def io_errors(path: str | os.PathLike, action: str = "write") -> Iterator[None]:
    """Turn an `OSError` raised while writing `path` into a one-line `UserError` (exit 2)."""
    try:
        yield
    except OSError as e:
        raise UserError(io_error_line(e, path, action)) from e


def check_output_path(path: str | os.PathLike, force: bool, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse to overwrite an existing file unless `force`, or a suffix not in `suffixes`; then make sure
    the parent folder exists and can be written (only once the path is known to be acceptable)."""
    path = Path(path)
    if suffixes and path.suffix not in suffixes:
        raise UserError(f"{path}: unknown file type {path.suffix or '(none)'}; use one of {', '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{path} is a directory: give a file path")
    if path.exists() and not force:
        raise UserError(f"{path} already exists: pass --force to overwrite it")
    probe_writable(path)  # a read-only or full disk fails now, before a long export
    return path


def probe_writable(path: str | os.PathLike | None) -> None:
    """Fail now, in one line, if `path` cannot be written (read-only disk, no permission), rather than after
    a long run whose report would then be lost. Creates the parent folder; leaves nothing else behind."""
    if path is None:
        return
    path = Path(path)
    with io_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[list[Path]]:
    """Files appended to the yielded list are removed if the block fails: an artifact and its sidecar manifest
    appear together or not at all."""
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for f in written:
            Path(f).unlink(missing_ok=True)
        raise


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
    with io_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with io_errors(path):
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
    with io_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with io_errors(path):
            yield tmp
            for f in tmp.iterdir():
                _publish_mode(f, directory=f.is_dir())
            _publish_mode(tmp, directory=True)
            old = None
            if path.exists():  # move the old one aside first: at every moment one complete directory exists
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except OSError:
                if old is not None:  # put the previous directory back
                    os.replace(old / path.name, path)
                    shutil.rmtree(old, ignore_errors=True)
                raise
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

"""Atomic file writes: write to a temporary sibling, fsync, rename. A crash leaves the old file intact. A write that
fails because the disk or file system failed raises an OSError naming the file, whatever library wrote it
(`errors.disk_failure`), so one `except OSError` at the write sites handles them all. Also: sha256 of files (one
thread per file), and staging folders that are renamed into place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from leapalign_fast.errors import disk_failure


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once, at import: os.umask is process-wide


def atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp (and safetensors) make 0600; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        disk = disk_failure(e)
        if disk is not None and not isinstance(e, OSError):  # safetensors' or torch's own error type
            raise OSError(disk.errno, disk.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file, written atomically. Tensors are made contiguous CPU copies."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def write_text_atomic(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def digests(paths: list[Path]) -> list[str | OSError]:
    """sha256 of each file, one thread per file (hashlib releases the GIL): a full fine-tune's trained, EMA and
    optimizer files (~0.2 TB for FLUX) hash in parallel. An unreadable file gives its OSError."""

    def one(p):
        try:
            return file_sha256(p)
        except OSError as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
        return list(pool.map(one, paths))


def new_staging_dir(target: Path) -> Path:
    """A new, empty folder beside `target` (`.tmp-<name>.<random>`) to build it in: never an existing folder, so
    nothing already there is removed to make room. Disk failures are OSErrors."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))


def swap_in(staged: Path, target: Path) -> Path | None:
    """Rename the folder `staged` to `target`. An existing `target` is first renamed aside (`.old-<name>.<random>`)
    and removed after the swap; if it cannot be removed, its path is returned (the swap itself is done)."""
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}.", dir=target.parent))
        os.replace(target, old)  # onto the empty folder mkdtemp made: atomic, and never onto anything else
    try:
        os.replace(staged, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the previous one back
        raise
    fsync_dir(target.parent)
    if old is None:
        return None
    shutil.rmtree(old, ignore_errors=True)
    return old if old.exists() else None

"""A Hugging Face Hub cache laid out exactly as huggingface_hub writes it, from local folders (no network):
<cache>/<models|datasets>--org--name/{blobs/<hash>, snapshots/<commit>/<path> -> ../../blobs/<hash>, refs/<rev>}.
Blobs are named as the Hub names them: the git blob sha1 of a small file, the sha256 of a large (LFS) one; with `tree`,
the commit's file listing (trees/<commit>.json) is written by huggingface_hub's own writer, as snapshot_download does,
so an offline read of a snapshot that lost a file fails in huggingface_hub itself."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_MIN = 10 * 1024 * 1024  # the Hub stores files above ~10 MB (and binary weights) in LFS


def _blob_hash(data: bytes, lfs: bool) -> str:
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_repo(
    cache: Path,
    repo_id: str,
    files: dict[str, Path | bytes],
    repo_type: str = "model",
    revision: str = "main",
    commit: str | None = None,
    tree: bool = True,
) -> Path:
    """Lay out `files` ({path in repo: local file or bytes}) as one commit of `repo_id` in `cache`, `refs/<revision>`
    pointing at it (and, with `tree`, its file listing); returns the snapshot folder."""
    storage = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    blobs = storage / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    datas = {p: (f if isinstance(f, bytes) else Path(f).read_bytes()) for p, f in files.items()}
    commit = (
        commit
        or hashlib.sha1(repr(sorted((p, hashlib.sha1(d).hexdigest()) for p, d in datas.items())).encode()).hexdigest()
    )
    snapshot = storage / "snapshots" / commit
    listing = {}
    for path, data in datas.items():
        lfs = len(data) >= LFS_MIN or path.endswith((".safetensors", ".pt", ".pth", ".bin"))
        blob = blobs / _blob_hash(data, lfs)
        listing[path] = (len(data), _blob_hash(data, False), _blob_hash(data, True) if lfs else None)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(commit)  # no newline, as huggingface_hub writes it
    if tree:
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

        entries = {p: TreeCacheEntry(n, git, lfs, n if lfs else None) for p, (n, git, lfs) in listing.items()}
        write_tree_cache(str(storage), commit, entries)
    return snapshot


def add_folder(cache: Path, repo_id: str, folder: Path, **kw) -> Path:
    """Every file under `folder` as one commit of `repo_id`."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return add_repo(cache, repo_id, files, **kw)

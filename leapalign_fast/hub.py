"""Hugging Face Hub ids wherever a path is taken: a model, a reward's weights, a prompt set.

A value is a local path when it exists (or is absolute, or starts with `.` or `~`); otherwise one of
    org/name                                a repository (a snapshot folder), diffusers' `from_pretrained` convention
    hf://[datasets/]org/name[@rev][/path]   huggingface_hub's file-system URL: a file, or with no path the repository
resolved through huggingface_hub's cache and its conventions: HF_HOME / HF_HUB_CACHE (where), HF_HUB_OFFLINE (no
network: the cache only), HF_TOKEN or `hf auth login` (gated and private repositories). Only the files a
command needs are fetched (`allow_patterns`). On a multi-process launch one process downloads while the others wait
on a file lock beside the cache, then find the files there.

The API, for the commands and for `leapalign-fast doctor`:
- `resolve(source, revision, allow_patterns, what)` -> local folder (a local path is returned as it is)
- `resolve_file(value, what)` -> local file (a local path, or hf://org/name/file)
- `status(source, revision, allow_patterns)` -> `HubStatus` (present / stale / missing / gated / not-found / local),
  without downloading anything
Every failure is one `UserError` line saying what to do (`hub_error`).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from leapalign_fast.errors import UserError

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name as the Hub spells repository ids
_URL = re.compile(r"^hf://(?:(datasets|models)/)?([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@([^/]+))?(?:/(.+))?$")
_RESOLVED: dict[tuple, Path] = {}  # (repo, type, revision, patterns) -> folder, resolved once per process
LOCK_TIMEOUT_S = 6 * 3600  # the wait for another process's download (FLUX.1-dev's transformer is 24 GB)


@dataclass(frozen=True)
class HubRef:
    """A repository on the Hub (and, for `hf://...` file URLs, one file in it)."""

    repo_id: str
    repo_type: str = "model"  # model | dataset
    revision: str | None = None  # branch, tag or commit; None: the default branch
    filename: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo_id}"


def parse(value, revision: str | None = None, repo_type: str = "model") -> HubRef | None:
    """`value` as a hub reference, or None when it is a local path (it exists, is absolute, or starts with . or ~).
    `revision` applies to a bare org/name (an `@rev` in a hf:// URL wins)."""
    text = str(value)
    if not text or text == "tiny":
        return None
    m = _URL.match(text)
    if m:
        kind, repo, rev, filename = m.groups()
        return HubRef(repo, "dataset" if kind == "datasets" else repo_type, rev or revision or None, filename)
    if text.startswith(("/", ".", "~")) or Path(text).exists() or not _REPO.match(text):
        return None
    return HubRef(text, repo_type, revision or None)


def is_hub(value) -> bool:
    return parse(value) is not None


def cache_dir() -> Path:
    """The Hub cache in use (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), read at call time."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _lock(ref: HubRef):
    """A file lock beside the cache: the first process to take it downloads, the others wait and then find the
    files cached (huggingface_hub's own per-file locks keep concurrent writers safe; this one keeps a 16-process
    launch from fetching the same 24 GB sixteen times over). Offline nothing is downloaded: no lock (the cache may
    be read-only)."""
    import contextlib

    from filelock import FileLock

    if offline():
        return contextlib.nullcontext()

    folder = cache_dir() / ".locks" / "leapalign-fast"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{ref.repo_type}s--{ref.repo_id.replace('/', '--')}.lock"
    return FileLock(str(folder / name), timeout=LOCK_TIMEOUT_S)


def resolve(
    source,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    what: str = "model.source",
    repo_type: str = "model",
) -> Path:
    """A local folder for `source`: a local path as it is (unchecked: the caller's loader names what it lacks),
    a hub repository as its cache snapshot holding (at least) the files matching `allow_patterns` (None: all),
    downloaded first unless HF_HUB_OFFLINE. A failure is one UserError line naming `what` and the fix."""
    ref = parse(source, revision, repo_type)
    if ref is None:
        return Path(source)
    key = (ref.repo_id, ref.repo_type, ref.revision, tuple(allow_patterns or ()))
    if key in _RESOLVED:
        return _RESOLVED[key]
    from huggingface_hub import snapshot_download

    try:
        with _lock(ref):
            folder = snapshot_download(
                ref.repo_id, repo_type=ref.repo_type, revision=ref.revision, allow_patterns=allow_patterns
            )
    except Exception as e:  # noqa: BLE001 - mapped to one line where known (hub_error), else re-raised
        error = hub_error(e, ref, what, allow_patterns)
        if error is e:
            raise
        raise error from None
    _RESOLVED[key] = Path(folder)
    return Path(folder)


def resolve_file(value, what: str, revision: str | None = None) -> Path:
    """A local file for `value`: a local path as it is, or `hf://[datasets/]org/name[@rev]/path/in/repo` as the
    cached file (downloaded first unless HF_HUB_OFFLINE)."""
    ref = parse(value, revision)
    if ref is None:
        return Path(value)
    if ref.filename is None:
        raise UserError(
            f"{what} {value} names a repository, not a file; write hf://{ref.repo_id}/<file in the repository>"
        )
    key = (ref.repo_id, ref.repo_type, ref.revision, ("=" + ref.filename,))
    if key in _RESOLVED:
        return _RESOLVED[key]
    from huggingface_hub import hf_hub_download

    try:
        with _lock(ref):
            path = hf_hub_download(ref.repo_id, ref.filename, repo_type=ref.repo_type, revision=ref.revision)
    except Exception as e:  # noqa: BLE001 - mapped to one line where known (hub_error), else re-raised
        error = hub_error(e, ref, what)
        if error is e:
            raise
        raise error from None
    _RESOLVED[key] = Path(path)
    return Path(path)


def hub_error(e: BaseException, ref: HubRef, what: str, patterns: list[str] | None = None) -> BaseException:
    """huggingface_hub's (and the network's and the disk's) failures as one UserError line each; anything else is
    returned as it is (the caller raises it, traceback and all)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{what} {ref}" + (f" (file {ref.filename})" if ref.filename else "")
    login = "`hf auth login` (or set HF_TOKEN)"
    if isinstance(e, UserError):
        return e
    if isinstance(e, GatedRepoError):
        who = "the token in use has no access" if _has_token() else "no Hugging Face token is set"
        return UserError(
            f"{name}: the repository is gated and {who}; accept its terms at {ref.url} with your account, then "
            f"{login} and rerun"
        )
    if isinstance(e, RevisionNotFoundError):
        return UserError(
            f"{name}: revision '{ref.revision}' does not exist in {ref.repo_id}; give a branch, tag or commit of it "
            "(model.revision, or @rev in a hf:// URL)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return UserError(
            f"{name}: no such repository on the Hugging Face Hub (or it is private and "
            f"{'the token has no access' if _has_token() else 'no token is set'}), and no local path of that name; "
            f"check the id, or {login}"
        )
    if isinstance(e, LocalEntryNotFoundError):  # offline (or unreachable) and not in the cache
        missing = re.search(r"missing \((.*?)\)", str(e))
        part = f"lacks {missing.group(1)}" if missing else "is not there"
        rev = f"revision '{ref.revision}' of " if ref.revision else ""
        why = "HF_HUB_OFFLINE=1" if offline() else f"the Hub cannot be reached ({_first_line(e.__cause__ or e)})"
        return UserError(
            f"{name}: {rev}{ref.repo_id} in the Hugging Face cache {cache_dir()} {part} and {why}; download it on a "
            f"connected machine (`hf download {ref.repo_id}"
            f"{' --repo-type dataset' if ref.repo_type == 'dataset' else ''}"
            f"{' --revision ' + ref.revision if ref.revision else ''}"
            f"{' --include ' + ' '.join(repr(p) for p in patterns) if patterns else ''}` into the same HF_HOME), "
            "or rerun with network access"
        )
    if isinstance(e, EntryNotFoundError):
        return UserError(f"{name}: {ref.repo_id} has no such file; check the file name (and the revision)")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"{name}: the disk is full while downloading into {cache_dir()}; free space or point HF_HOME (or "
            "HF_HUB_CACHE) at a larger disk, then rerun (files already downloaded are kept)"
        )
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return UserError(
            f"{name}: cannot write the Hugging Face cache {cache_dir()} ({e.strerror}); point HF_HOME (or "
            "HF_HUB_CACHE) at a writable folder"
        )
    network = type(e).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}
    if network or isinstance(e, (HfHubHTTPError, ConnectionError, TimeoutError)) or type(e).__name__.startswith("Xet"):
        return UserError(
            f"{name}: the download was interrupted ({type(e).__name__}: {_first_line(e)}); rerun: files already "
            "complete are kept in the cache, the rest is fetched again"
        )
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


@dataclass(frozen=True)
class HubStatus:
    """Where `source` stands, without downloading: `state` is one of
    local (a local path that exists), present (cached, and current when the Hub could be asked), stale (cached,
    but the revision has moved on the Hub), missing (not cached, or a local path that does not exist), gated (the
    Hub refuses this machine's token), not-found (no such repository or revision); `detail` is one line (the fix),
    `path` the cached or local folder when there is one."""

    state: str
    detail: str
    path: Path | None = None


def status(
    source,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    repo_type: str = "model",
    what: str = "model.source",
) -> HubStatus:
    """The state of `source` (see HubStatus). Offline (HF_HUB_OFFLINE) only the cache is read; online, one metadata
    request asks the Hub for the revision's commit and whether this machine's token may download it."""
    ref = parse(source, revision, repo_type)
    if ref is None:
        p = Path(source)
        return HubStatus("local", str(p), p) if p.exists() else HubStatus("missing", f"{what} {p} does not exist")
    from huggingface_hub import snapshot_download

    cached: Path | None = None
    try:
        cached = Path(
            snapshot_download(
                ref.repo_id,
                repo_type=ref.repo_type,
                revision=ref.revision,
                allow_patterns=allow_patterns,
                local_files_only=True,
            )
        )
    except Exception as e:  # noqa: BLE001 - not cached (or partly): the state says so
        from huggingface_hub.errors import LocalEntryNotFoundError

        if not isinstance(e, LocalEntryNotFoundError):
            raise
    if offline():
        if cached is not None:
            return HubStatus(
                "present", f"{ref} cached at {cached} (HF_HUB_OFFLINE=1: not compared with the Hub)", cached
            )
        return HubStatus("missing", str(hub_error(_offline_missing(), ref, what)))
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        info = api.repo_info(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision)
        api.auth_check(ref.repo_id, repo_type=ref.repo_type)
    except Exception as e:  # noqa: BLE001 - mapped below; anything unknown re-raised
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        error = hub_error(e, ref, what)
        if isinstance(e, GatedRepoError):
            return HubStatus("gated", str(error), cached)
        if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
            return HubStatus("not-found", str(error), cached)
        if not isinstance(error, UserError):
            raise error from e
        state = "present" if cached is not None else "missing"
        return HubStatus(state, f"{ref}: the Hub could not be asked ({error})", cached)
    if cached is None:
        return HubStatus("missing", f"{ref} is not cached; the first run downloads it (or `hf download`)")
    if cached.name != info.sha:
        return HubStatus(
            "stale",
            f"{ref}: the cache holds commit {cached.name[:12]}, the Hub has {info.sha[:12]}; rerun online to update",
            cached,
        )
    return HubStatus("present", f"{ref} cached at {cached}", cached)


def _offline_missing() -> Exception:
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError("not in the cache")


# ---- what each command needs of a diffusers model repository -------------------------------------------------

DENOISER_PATTERNS = ["model_index.json", "scheduler/*", "transformer/*", "vae/*"]
TEXT_PATTERNS = ["text_encoder*/*", "tokenizer*/*"]


def model_patterns(need_text: bool) -> list[str]:
    """The files of a diffusers pipeline repository a command reads: the transformer, VAE and scheduler, and the
    text encoders with their tokenizers only when some prompt embeddings are not cached (never the repository's
    single-file checkpoints, e.g. FLUX.1-dev's flux1-dev.safetensors and ae.safetensors at its root)."""
    return DENOISER_PATTERNS + (TEXT_PATTERNS if need_text else [])


def resolve_model(source, revision: str | None = None, need_text: bool = True) -> Path:
    """`model.source` as a local diffusers-format folder (see `model_patterns`)."""
    return resolve(source, revision, model_patterns(need_text), "model.source")


def describe_env() -> str:
    """HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE / token, in one line (for `doctor` and error context)."""
    return (
        f"cache {cache_dir()}, HF_HUB_OFFLINE={'1' if offline() else '0'}, "
        f"token {'set' if _has_token() else 'not set'}, HF_ENDPOINT={os.environ.get('HF_ENDPOINT', 'default')}"
    )

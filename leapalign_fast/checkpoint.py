"""Checkpoints: everything a run's future depends on, in safetensors + JSON, written atomically.

Layout: `<output_dir>/checkpoints/step_00000008/` holding
  trained.safetensors    trained parameters by name (LoRA or full)
  ema.safetensors        EMA of the trained parameters (if enabled)
  optimizer.safetensors  optimizer tensors;  optimizer.json its scalars and param groups
  rng_rank<r>.safetensors / .json   every RNG state of rank r
  metrics.jsonl          the run's metrics log up to this step (restored on resume: each step logged once)
  state.json             step, prompt position, scheduler, config, prompt-file hash
  manifest.json          sha256 of every other file; written last
A checkpoint is built in `.tmp-step_*` and renamed into place, so a `step_*` directory is complete when
written; leftovers of a crash are removed on resume. A `step_*` directory whose files no longer match the
manifest is damaged: resume falls back to the newest intact one and moves the damaged one aside to
`damaged-step_*`. Nothing here deletes a checkpoint except pruning beyond `keep_checkpoints`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from leapalign_fast.errors import UserError
from leapalign_fast.io import fsync_dir, save_tensors_atomic, write_json_atomic, write_text_atomic

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
FAULT_ENV = "LEAPALIGN_FAULT"  # tests: "checkpoint_write:<step>" SIGKILLs the process mid-write of that step


def _fault_point(name: str, step: int) -> None:
    """Crash-test hook: die hard at a named point when LEAPALIGN_FAULT asks for it (never set in real runs)."""
    if os.environ.get(FAULT_ENV) == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories (`step_*`, renamed into place only once complete), oldest first; not verified."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_partial(output_dir: str | Path) -> list[Path]:
    """Delete the staging dirs (`.tmp-*`) of checkpoints a crash left half-written. Never a `step_*` dir."""
    root = checkpoint_root(output_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".tmp-"):
                shutil.rmtree(p)
                removed.append(p)
    return removed


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


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the checkpoint matches its manifest; else what is wrong, in a few words."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and "state.json" in files and "trained.safetensors" in files
    except FileNotFoundError:
        return None if _legacy(path) else f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST} is unreadable or incomplete"
    names = sorted(files)
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    for name, got in zip(names, digests([path / n for n in names])):
        if isinstance(got, OSError):
            return f"{name} cannot be read ({got.strerror})"
        if got != files[name]:
            return f"{name} does not match its checksum"
    return None


def _legacy(path: Path) -> bool:
    """A complete checkpoint written before checksums existed (its state.json lacks the `checksummed` mark):
    accepted unverified, so runs started with an older version still resume."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "checksummed" not in state and (path / "trained.safetensors").is_file()


def choose_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest intact checkpoint or None, [(damaged newer checkpoint, what is wrong)]).
    A UserError when checkpoints exist but none is intact (nothing is changed)."""
    damaged = []
    found = list_checkpoints(output_dir)
    for p in reversed(found):
        problem = verify_checkpoint(p)
        if problem is None:
            return p, damaged
        damaged.append((p, problem))
    if damaged:
        what = "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
        raise UserError(f"no intact checkpoint in {checkpoint_root(output_dir)} ({what}); nothing was changed: restore "
                        "the files, or start over in a new output_dir")  # fmt: skip
    return None, []


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint out of the way (kept for inspection, never deleted)."""
    target = path.with_name(f"damaged-{path.name}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"damaged-{path.name}.{n}"), n + 1
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


# ---- optimizer state <-> (tensors, json) -------------------------------------------------------------


def optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---- RNG states ----------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- save / load ---------------------------------------------------------------------------------------


def save_rank_rng(tmp_dir: Path, rank: int) -> None:
    """Every rank writes its own RNG state into the checkpoint being built."""
    tensors, meta = rng_state()
    try:
        save_tensors_atomic(tensors, tmp_dir / f"rng_rank{rank}.safetensors")
        write_json_atomic(tmp_dir / f"rng_rank{rank}.json", meta)
    except OSError as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise _write_failed(tmp_dir.parent.parent, tmp_dir.name.removeprefix(".tmp-step_"), e) from None


def _write_failed(output_dir, step, e: OSError) -> UserError:
    older = list_checkpoints(output_dir)
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    return UserError(f"cannot write checkpoint step {int(step)} in {checkpoint_root(output_dir)}: {why}; its staging "
                     f"dir was removed, older checkpoints are intact (newest: {older[-1].name if older else 'none'}); "
                     "free space or fix permissions, then rerun with resume=true")  # fmt: skip


def staging_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp-step_{step:08d}"


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    trained: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    optimizer_state: dict,
    state: dict,
    keep: int,
    metrics: Path | None = None,
) -> Path:
    """Rank 0: finish the staged checkpoint (ranks' RNG files are already there), rename it, prune old ones.
    A failed write (disk full, ...) removes the staging dir and is a UserError; older checkpoints are untouched."""
    tmp = staging_dir(output_dir, step)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(trained, tmp / "trained.safetensors")
        _fault_point("checkpoint_write", step)
        if ema is not None:
            save_tensors_atomic(ema, tmp / "ema.safetensors")
        opt_tensors, opt_meta = optimizer_to_files(optimizer_state)
        save_tensors_atomic(opt_tensors, tmp / "optimizer.safetensors")
        write_json_atomic(tmp / "optimizer.json", opt_meta)
        if metrics is not None and metrics.is_file():
            write_text_atomic(tmp / "metrics.jsonl", metrics.read_text())
        write_json_atomic(tmp / "state.json", {"step": step, "checksummed": True, **state})
        _fault_point("checkpoint_manifest", step)
        written = [p for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")]
        files = {}
        for p, got in zip(written, digests(written)):
            if isinstance(got, OSError):
                raise got
            files[p.name] = got
        write_json_atomic(tmp / MANIFEST, {"step": step, "files": files})  # last
        final = checkpoint_root(output_dir) / f"step_{step:08d}"
        if final.exists():  # same step written again (e.g. final step after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(output_dir, step, e) from None
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def read_checkpoint(path: Path, rank: int) -> dict:
    """Everything in a checkpoint directory, for this rank. Unreadable content is a UserError."""
    return _guarded(path, lambda: _read_checkpoint(path, rank))


def read_weights(path: Path, name: str = "trained") -> dict[str, torch.Tensor]:
    """One weights file of a checkpoint (`trained` or `ema`). Unreadable content is a UserError."""
    return _guarded(path, lambda: load_file(str(path / f"{name}.safetensors")))


def _guarded(path: Path, read):
    try:
        return read()
    except Exception as e:  # noqa: BLE001 - OSError, JSON, safetensors' own SafetensorError, a missing key, ...
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); use an intact "
                        "checkpoint or a new output_dir") from None  # fmt: skip


def _read_checkpoint(path: Path, rank: int) -> dict:
    out = {
        "state": json.loads((path / "state.json").read_text()),
        "trained": load_file(str(path / "trained.safetensors")),
        "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None,
        "optimizer": optimizer_from_files(
            load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())
        ),
    }
    rng = path / f"rng_rank{rank}.safetensors"
    if rng.is_file():
        out["rng"] = (load_file(str(rng)), json.loads((path / f"rng_rank{rank}.json").read_text()))
    return out

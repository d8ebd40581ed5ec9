"""Checkpoints: everything a run's future depends on, in safetensors + JSON, written atomically; a run's save and
resume (FSDP runs: sharded, through dist_checkpoint.py).

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

import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from leapalign_fast import dist_checkpoint as dcp_ckpt
from leapalign_fast.build import load_trained, trained_state, unwrap
from leapalign_fast.config import Config, config_dict
from leapalign_fast.dist_checkpoint import SHARDS
from leapalign_fast.dtypes import DTYPES
from leapalign_fast.ema import EMA
from leapalign_fast.errors import TrainingDiverged, UserError, disk_failure, disk_reason
from leapalign_fast.fsdp import all_finite, full_tensors
from leapalign_fast.io import (
    digests,
    fsync_dir,
    save_tensors_atomic,
    write_json_atomic,
    write_text_atomic,
)
from leapalign_fast.model_dir import export_mark, model_config, write_model_dir
from leapalign_fast.models.lora_export import export_lora
from leapalign_fast.prompts import validation_prompts
from leapalign_fast.resume_settings import apply_optimizer_settings, prompts_digest

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


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the checkpoint matches its manifest; else what is wrong, in a few words."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and "state.json" in files
        assert "trained.safetensors" in files or f"{SHARDS}/.metadata" in files  # single-process or sharded
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
        raise UserError(
            f"no intact checkpoint in {checkpoint_root(output_dir)} ({what}); nothing was changed: restore "
            "the files, or start over in a new output_dir"
        )
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


def pin(path: Path) -> Path | None:
    """Hard links of every file of the checkpoint `path` in a new folder beside it (`.pin-<name>.<random>`), so
    that what a reader verifies and reads stays on disk even if the live run prunes or replaces `path` meanwhile
    (`eval` of `latest` or `best/`). None when the file system cannot link there (read-only, no hard links): read
    in place. FileNotFoundError when `path` lost a file meanwhile (it is being pruned): try the next newest.
    Remove the pin with `unpin`."""
    try:
        pinned = Path(tempfile.mkdtemp(prefix=f".pin-{path.name}.", dir=path.parent))
    except OSError:
        return None
    try:
        for src in sorted(path.rglob("*")):
            dst = pinned / src.relative_to(path)
            if src.is_dir():
                dst.mkdir()
            else:
                os.link(src, dst)
        if not (path / "state.json").is_file() and not (path / MANIFEST).is_file():
            raise FileNotFoundError(f"{path} holds no checkpoint files")
    except FileNotFoundError:
        unpin(pinned)
        raise
    except OSError:  # EXDEV, EPERM, EMLINK, ...: no hard links here
        unpin(pinned)
        return None
    return pinned


def unpin(pinned: Path | None) -> None:
    if pinned is not None:
        shutil.rmtree(pinned, ignore_errors=True)


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
    why = disk_reason(e)
    return UserError(
        f"cannot write checkpoint step {int(step)} in {checkpoint_root(output_dir)}: {why}; its staging "
        f"dir was removed, older checkpoints are intact (newest: {older[-1].name if older else 'none'}); "
        "free space or fix permissions, then rerun with resume=true"
    )


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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(output_dir, step, e) from None
    return commit_staged(output_dir, step, keep)


def _staged_files(tmp: Path) -> list[Path]:
    """The files a manifest covers: the staging dir's own (not atomic writes' dot-temporaries) and every file of
    its DCP shard folder (whose `.metadata` is a dotfile)."""
    files = [p for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if (tmp / SHARDS).is_dir():
        files += [p for p in sorted((tmp / SHARDS).iterdir()) if p.is_file()]
    return files


def write_manifest(directory: Path, step: int) -> None:
    """`manifest.json` (written last): the sha256 of every other file of a checkpoint (or `best/`) being staged in
    `directory`. Disk failures are OSErrors."""
    written = _staged_files(directory)
    files = {}
    for p, got in zip(written, digests(written)):
        if isinstance(got, OSError):
            raise got
        files[p.relative_to(directory).as_posix()] = got
    write_json_atomic(directory / MANIFEST, {"step": step, "files": files})


def commit_staged(output_dir: str | Path, step: int, keep: int) -> Path:
    """Rank 0, once every file of the staged checkpoint is written: sha256 manifest (last), rename into place,
    prune beyond `keep`. A failed write removes the staging dir and is a UserError."""
    tmp = staging_dir(output_dir, step)
    try:
        _fault_point("checkpoint_manifest", step)
        write_manifest(tmp, step)  # last
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
        raise UserError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); use an intact "
            "checkpoint or a new output_dir"
        ) from None


def _read_checkpoint(path: Path, rank: int) -> dict:
    out = {
        "state": json.loads((path / "state.json").read_text()),
        "trained": load_file(str(path / "trained.safetensors")),
        "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None,
        "optimizer": optimizer_from_files(
            load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())
        ),
    }
    return read_rng(path, rank, out)


def read_rng(path: Path, rank: int, out: dict) -> dict:
    """`out` with this rank's RNG state of checkpoint `path` under "rng" (a rank the saving run did not have, in a
    resharded resume, has none)."""
    rng = path / f"rng_rank{rank}.safetensors"
    if rng.is_file():
        out["rng"] = (load_file(str(rng)), json.loads(rng.with_suffix(".json").read_text()))
    return out


# ---- a run's save and resume: one interface, a local and a sharded implementation ---------------------------

# Config keys whose change alters the math of a resumed run.
MATH_KEYS = (
    "seed",
    "batch_size",
    "grad_accum",
    "num_steps",
    "resolution",
    "height",
    "width",
    "num_frames",
    "guidance",
    "method_draws",
    "lr",
    "weight_decay",
    "adam_betas",
    "adam_eps",
    "warmup_steps",
    "max_grad_norm",
    "ema_decay",
    "mixed_precision",
    "prompt_file",
    "prompts",
    "model",
    "lora",
    "method",
    "reward",
)


def newest(out: Path) -> str:
    found = list_checkpoints(out)
    return str(found[-1]) if found else "none"


def config_differences(saved: dict, current: dict, keys=MATH_KEYS, defaults: dict | None = None) -> list[str]:
    defaults = config_dict(Config()) if defaults is None else defaults
    diffs = []
    for k in keys:
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(k) if isinstance(defaults.get(k), dict) else {}
            diffs += [f"{k}.{d}" for d in config_differences(a, b, sorted(set(a) | set(b)), sub)]
        elif k not in saved and k in defaults and b == defaults[k]:  # a key added since the checkpoint, at default
            continue
        elif a != b:
            diffs.append(f"{k} ({a!r} -> {b!r})")
    return diffs


@dataclass
class TrainState:
    """What a checkpoint holds of a run besides its config: the (maybe wrapped) transformer, its optimizer and
    scheduler, the EMA (or None). Loading writes into these objects in place."""

    transformer: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None


class Checkpointer:
    """A run's checkpoints: save, resume, verify, prune, export. The layout, staging, manifest, fallback to the
    newest intact checkpoint and the config check are written once here; `LocalCheckpointer` (one process or DDP:
    rank 0 writes safetensors) and `ShardedCheckpointer` (FSDP: every rank writes its DCP shards) differ only in
    how the weights and optimizer state are written and read. Every rank calls every method."""

    sharded = False

    def __init__(self, cfg: Config, accelerator, out: Path, prompts: list[str]):
        self.cfg, self.acc, self.out, self.prompts = cfg, accelerator, Path(out), prompts
        # The validation prompts' hash, compared on resume like the training prompts' (best/ was chosen on them).
        self.eval_digest = next((prompts_digest(p) for p in validation_prompts(cfg)), None)

    # -- shared ------------------------------------------------------------------------------------------
    verify = staticmethod(verify_checkpoint)

    def list(self) -> list[Path]:
        return list_checkpoints(self.out)

    def say(self, text: str) -> None:
        if self.acc.is_main_process:
            print(f"leapalign-fast: {text}", flush=True)

    def save(self, step: int, consumed: int, state: TrainState) -> Path:
        """Checkpoint at `step` (prunes beyond keep_checkpoints). Never writes weights that cannot be resumed
        usefully: non-finite weights are TrainingDiverged. The returned directory exists once the save is
        committed (`wait()`; synchronous saves are committed on return)."""
        started = time.perf_counter()
        trained = trained_state(state.transformer)
        ema = state.ema.shadow if state.ema is not None else None
        bad = self._nonfinite(trained, ema)  # every rank takes the same branch; one host sync per checkpoint
        if bad:
            raise TrainingDiverged(
                f"the trained weights are non-finite at step {step} (e.g. {bad}); not checkpointed. "
                f"Last good checkpoint: {newest(self.out)}. Lower lr or check the reward."
            )
        self.wait()  # at most one save in flight: the previous one is committed before this one starts
        tmp = staging_dir(self.out, step)
        if self.acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        save_rank_rng(tmp, self.acc.process_index)
        self.acc.wait_for_everyone()
        meta = {
            "consumed": consumed,
            "scheduler": state.scheduler.state_dict(),
            "config": config_dict(self.cfg),
            "world_size": self.acc.num_processes,
            "prompts_sha256": prompts_digest(self.prompts),
            "eval_prompts_sha256": self.eval_digest,
        }
        metrics = self.out / "metrics.jsonl"
        if self.acc.is_main_process and metrics.is_file():  # the log is made durable whenever a checkpoint is
            with open(metrics, "rb+") as f:
                os.fsync(f.fileno())
        self._write(tmp, step, state, trained, ema, meta, metrics, started)
        return checkpoint_root(self.out) / f"step_{step:08d}"

    def resume(self, state: TrainState) -> tuple[int, int]:
        """Load the newest intact checkpoint into `state`; returns (step, prompts consumed), (0, 0) when there is
        none. Damaged newer checkpoints are reported and moved aside; none intact is a UserError (nothing
        changed); a config that differs in a math key is a UserError unless resume_force."""
        path, damaged = choose_checkpoint(self.out)
        self.acc.wait_for_everyone()  # every rank verified before rank 0 moves anything
        if path is None:
            if self.acc.is_main_process:
                remove_partial(self.out)
            self.say(f"resume=true: no checkpoint in {self.out}; starting from step 0")
            return 0, 0
        if dcp_ckpt.is_sharded(path) != self.sharded:
            written, now = ("fsdp=true", "fsdp=false") if not self.sharded else ("fsdp=false", "fsdp=true")
            raise UserError(
                f"cannot resume from {path}: it was written with {written} and this run has {now}; resume "
                f"with {written}, or export it (`leapalign-fast export`) and start a new run from that"
            )
        data = _guarded(path, lambda: self._read(path))
        diffs = config_differences(data["state"]["config"], config_dict(self.cfg))
        saved_prompts = data["state"].get("prompts_sha256")
        if saved_prompts is not None and saved_prompts != prompts_digest(self.prompts):
            diffs.append("the training prompts (file content changed)")
        saved_eval = data["state"].get("eval_prompts_sha256")
        if saved_eval is not None and self.eval_digest is not None and saved_eval != self.eval_digest:
            diffs.append("the validation prompts (eval_prompt_file content changed; best/ was chosen on the old ones)")
        if diffs and not self.cfg.resume_force:
            raise UserError(
                f"cannot resume from {path}: its config differs in {', '.join(diffs)}; use the saved config "
                f"({self.out / 'config.toml'}), a new output_dir, or resume_force=true to resume anyway"
            )
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            remove_partial(self.out)
            for bad, problem in damaged:
                self.say(
                    f"checkpoint {bad.name} is damaged ({problem}); moved to {set_aside(bad).name}, "
                    f"resuming from {path.name}"
                )
        self.acc.wait_for_everyone()
        had_ema = self._load(path, data, state)
        state.scheduler.load_state_dict(data["state"]["scheduler"])
        # Only under resume_force can these differ: the new values are used, and each change is logged.
        for change in apply_optimizer_settings(self.cfg, state.optimizer, state.scheduler):
            self.say(f"resume_force: optimizer now uses {change}")
        if state.ema is not None and not had_ema:  # EMA newly enabled (resume_force): from the resumed weights
            state.ema.reset(trained_state(state.transformer))
            self.say(f"checkpoint {path.name} has no EMA; the EMA starts from its weights")
        if self.acc.is_main_process:
            log = self.out / "metrics.jsonl"
            if (path / "metrics.jsonl").is_file():  # the log up to the checkpoint, verified: each step exactly once
                write_text_atomic(log, (path / "metrics.jsonl").read_text())
            else:
                truncate_metrics(log, int(data["state"]["step"]))
        if "rng" in data:
            set_rng_state(*data["rng"])
        return int(data["state"]["step"]), int(data["state"]["consumed"])

    # -- what the implementations differ in ---------------------------------------------------------------
    def _nonfinite(self, trained: dict, ema: dict | None) -> str | None:
        raise NotImplementedError

    def _write(self, tmp, step, state, trained, ema, meta, metrics, started) -> None:
        raise NotImplementedError

    def _read(self, path: Path) -> dict:
        raise NotImplementedError

    def _load(self, path: Path, data: dict, state: TrainState) -> bool:
        """Load weights, EMA and optimizer state into `state`; returns whether the checkpoint had an EMA."""
        raise NotImplementedError

    def export(self, step: int, state: TrainState, pipeline: str) -> None:
        """The end of a run: its diffusers-loadable weights (lora/, lora_ema/; sharded full fine-tunes:
        transformer/, transformer_ema/). Every rank calls it."""
        raise NotImplementedError

    def wait(self) -> None:
        """Block until the save in flight, if any, is committed."""

    def close(self) -> None:
        """Commit the save in flight and release the background writer."""


class LocalCheckpointer(Checkpointer):
    """One process or DDP: identical weights on every rank; rank 0 writes safetensors, every rank its RNG."""

    def _nonfinite(self, trained, ema):
        return next((n for n, t in {**trained, **(ema or {})}.items() if not torch.isfinite(t).all()), None)

    def _write(self, tmp, step, state, trained, ema, meta, metrics, started):
        if self.acc.is_main_process:
            scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
            write_checkpoint(
                self.out,
                step,
                trained,
                ema,
                state.optimizer.state_dict(),
                {**meta, "grad_scaler": scaler},
                self.cfg.keep_checkpoints,
                metrics=metrics,
            )
        self.acc.wait_for_everyone()

    def _read(self, path):
        return _read_checkpoint(path, self.acc.process_index)  # resume guards the read

    def _load(self, path, data, state):
        load_trained(unwrap(state.transformer), data["trained"], path)
        state.optimizer.load_state_dict(data["optimizer"])
        if self.acc.scaler is not None and data["state"].get("grad_scaler"):
            self.acc.scaler.load_state_dict(data["state"]["grad_scaler"])
        if state.ema is not None and data["ema"] is not None:
            state.ema.shadow = {n: t.to(self.acc.device) for n, t in data["ema"].items()}
        return data["ema"] is not None

    def export(self, step, state, pipeline):
        if not self.acc.is_main_process:
            return
        model = unwrap(state.transformer)
        if self.cfg.lora.enabled:  # <Pipeline>.load_lora_weights
            export_lora(model, self.out / "lora", pipeline=pipeline)
            if state.ema is not None:
                export_lora(model, self.out / "lora_ema", state.ema.shadow, pipeline=pipeline)
            return
        # Full fine-tune: transformer/ (and transformer_ema/) as diffusers model directories, in the model dtype.
        # Each replaces the run's earlier export only (never a folder of other files there).
        dtype, config = DTYPES[self.cfg.model.dtype], model_config(model)
        last = checkpoint_root(self.out) / f"step_{step:08d}"
        weights = {n: t.detach().to("cpu", dtype) for n, t in model.state_dict().items()}
        write_model_dir(weights, config, self.out / "transformer", export_mark(last, False, step), replace_exports=True)
        if state.ema is not None:
            ema = {n: t.detach().to("cpu", dtype) for n, t in state.ema.shadow.items()}
            mark = export_mark(last, True, step)
            write_model_dir({**weights, **ema}, config, self.out / "transformer_ema", mark, replace_exports=True)


class ShardedCheckpointer(Checkpointer):
    """FSDP: every rank writes its own shards through DCP (maybe asynchronously, `async_checkpoint`); rank 0
    commits the checkpoint once every rank's shards are on disk. Loads at any world size (resharded by DCP)."""

    sharded = True

    def __init__(self, cfg, accelerator, out, prompts):
        super().__init__(cfg, accelerator, out, prompts)
        self.saver = dcp_ckpt.ShardedSaver(cfg.async_checkpoint, log=self.out / "checkpoints.jsonl")

    def _nonfinite(self, trained, ema):
        return None if all_finite([*trained.values(), *(ema or {}).values()]) else "a sharded weight"

    def save(self, step, consumed, state):
        unwrap(state.transformer).reshard()  # parameters as shards (the root stays unsharded after a no-grad forward)
        return super().save(step, consumed, state)

    def _write(self, tmp, step, state, trained, ema, meta, metrics, started):
        out, acc = self.out, self.acc
        if acc.is_main_process:
            try:
                dcp_ckpt.write_model_config(tmp, unwrap(state.transformer))
                if metrics.is_file():
                    write_text_atomic(tmp / "metrics.jsonl", metrics.read_text())
                write_json_atomic(
                    tmp / "state.json",
                    {"step": step, "checksummed": True, "format": dcp_ckpt.FORMAT, "grad_scaler": None, **meta},
                )
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise _write_failed(out, step, e) from None
        world, keep = acc.num_processes, self.cfg.keep_checkpoints

        def failed(error):  # rank 0, when any rank's part failed: no staging dir left, one line for disk errors
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, UserError):
                return error
            disk = disk_failure(error)  # an OSError, safetensors' or torch.save's error, inside DCP's per-rank ones
            return _write_failed(out, step, disk) if disk is not None else None

        def commit():  # rank 0, after every rank's shards are written
            try:
                dcp_ckpt.check_shards(tmp, world)
            except OSError as e:
                raise (failed(e) or e) from None
            return commit_staged(out, step, keep)

        shards = dcp_ckpt.sharded_state(unwrap(state.transformer), trained, ema, state.optimizer)
        _fault_point(f"checkpoint_shards_rank{acc.process_index}", step)
        self.saver.save(tmp, step, shards, commit, failed, started)

    def _read(self, path):
        return read_rng(path, self.acc.process_index, {"state": json.loads((path / "state.json").read_text())})

    def _load(self, path, data, state):
        saved_world = data["state"].get("world_size")
        if saved_world != self.acc.num_processes:
            self.say(
                f"resharding {path.name} from {saved_world} to {self.acc.num_processes} process(es): same "
                "weights, EMA and optimizer state; the global batch is now world x batch_size and each rank's "
                "noise stream is seeded by its rank, so the steps ahead differ from a same-size run"
            )
        shadow = state.ema.shadow if state.ema is not None else None
        model = unwrap(state.transformer)
        return dcp_ckpt.load_sharded(path, model, trained_state(state.transformer), shadow, state.optimizer)

    def export(self, step, state, pipeline):
        self.close()  # the last save is committed before anything reads it
        if self.cfg.lora.enabled:  # adapters gathered once (a collective; they are small), written by rank 0
            weights = {"lora": full_tensors(trained_state(state.transformer))}
            if state.ema is not None:
                weights["lora_ema"] = full_tensors(state.ema.shadow)
            if self.acc.is_main_process:
                for name, named in weights.items():
                    export_lora(unwrap(state.transformer), self.out / name, named, pipeline=pipeline)

    def export_full(self, step: int, ema: bool) -> None:
        """Full fine-tunes, rank 0 alone, after the other ranks are released: transformer/ (and transformer_ema/)
        consolidated from the last checkpoint's shards in this process, as `leapalign-fast export` does."""
        last = checkpoint_root(self.out) / f"step_{step:08d}"
        if last.is_dir():
            dcp_ckpt.export_transformer(last, self.out / "transformer", replace_exports=True)
            if ema:
                dcp_ckpt.export_transformer(last, self.out / "transformer_ema", ema=True, replace_exports=True)

    def wait(self):
        self.saver.wait()

    def close(self):
        self.saver.close()


def make_checkpointer(cfg: Config, accelerator, out: Path, prompts: list[str]) -> Checkpointer:
    """The run's checkpointer, chosen once: sharded under fsdp=true, else local."""
    return (ShardedCheckpointer if cfg.fsdp else LocalCheckpointer)(cfg, accelerator, out, prompts)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines after the resumed step, so the log has no duplicate steps."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash mid-write
    write_text_atomic(path, "".join(line + "\n" for line in keep))

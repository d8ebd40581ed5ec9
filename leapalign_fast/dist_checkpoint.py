"""Sharded checkpoints of FSDP runs through torch.distributed.checkpoint (DCP), asynchronous, reshardable.

Layout (beside the single-process one of checkpoint.py, same staging, commit and manifest):
  shards/.metadata, shards/__<rank>_0.distcp   DCP: trained weights ("trained.*"), EMA ("ema.*") and optimizer
                                               state ("optimizer.*"); every rank writes only its own shards
  rng_rank<r>.safetensors / .json              every RNG state of rank r
  model_config.json                            the transformer's diffusers config (for `leapalign-fast export`)
  metrics.jsonl, state.json ("format": "dcp"), manifest.json (sha256 of every file above, shards included; last)

A save: every rank writes its RNG state into `.tmp-step_*` and hands its shards to `dcp.async_save`, which
copies them to host memory (the "staging" copy: the only part that blocks training) and writes them in a
background thread. DCP's finish step gathers every rank's write result before rank 0 writes `.metadata`, so
when rank 0's write is done, every rank's shards are on disk (fsynced); rank 0 then hashes the files, writes
the manifest and renames the directory into place, still in the background. At most one save is in flight:
the next save, the end of the run and a pre-emption wait for it first. A rank killed mid-save leaves a
`.tmp-step_*` directory that resume removes; the previous checkpoint is untouched.

Resharding: the shards are DTensor pieces with their global offsets, so a run at another world size loads
the same global tensors, each rank reading the pieces its own shards overlap (`dcp.load`).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from leapalign_fast.errors import UserError
from leapalign_fast.io import save_tensors_atomic, write_json_atomic
from leapalign_fast.model_dir import check_export_target, export_mark, model_config, write_model_dir

SHARDS = "shards"
FORMAT = "dcp"


def is_sharded(path: Path) -> bool:
    return (path / SHARDS / ".metadata").is_file() or (path / SHARDS).is_dir()


def sharded_state(model, trained: dict, ema: dict | None, optimizer) -> dict:
    """The state DCP saves and loads in place: trained parameters and EMA (DTensors), optimizer state by
    parameter name (`get_optimizer_state_dict`: sharded like the parameters, independent of the world size)."""
    state = {"trained": trained, "optimizer": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state["ema"] = ema
    return state


STALE_MESH_WARNING = "pickling/unpickling of the DeviceMesh occurred before the PGs were created"


class _StaleMeshWarning(logging.Filter):
    """torch >= 2.14 warns once per DTensor when a pickled DeviceMesh is rebuilt where its process group cannot
    be looked up (seen from the asynchronous save's staged copies: 527 lines per failed save in one test run).
    Those copies are only written to disk, never run under torch.compile, which is what the warning is about;
    only that message is dropped, every other record of the logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return STALE_MESH_WARNING not in record.getMessage()


def quiet_stale_mesh_warning() -> None:
    """Install the filter on torch's device-mesh logger (once per process)."""
    mesh_log = logging.getLogger("torch.distributed.device_mesh")
    if not any(isinstance(f, _StaleMeshWarning) for f in mesh_log.filters):
        mesh_log.addFilter(_StaleMeshWarning())


class ShardedSaver:
    """DCP saves, synchronous or asynchronous, at most one in flight; rank 0 commits each after all ranks wrote."""

    def __init__(self, asynchronous: bool, log: Path | None = None):
        self.asynchronous, self.log = asynchronous, log
        self.rank = dist.get_rank()
        if asynchronous:
            quiet_stale_mesh_warning()
        # The background writes run their own collectives (plan, finish): on a group of their own, so they never
        # interleave with the training step's collectives on the default group. gloo: the staged copy is on CPU,
        # and so is the failure flag every rank agrees on after a save (an NCCL default group takes no CPU tensor).
        self.world = dist.get_world_size()
        self.group = dist.new_group(backend="gloo") if self.world > 1 else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-commit") if self.rank == 0 else None
        self.pending: tuple | None = None  # (step, DCP write, rank-0 commit, start time, blocking seconds)
        self.blocking_seconds: list[float] = []  # per save: time the training loop was held (tests, bench)

    def save(self, tmp: Path, step: int, state: dict, commit, on_failure, started: float | None = None) -> None:
        """Write `state`'s shards into `tmp/shards`; rank 0 then runs `commit()` (hash, manifest, rename). If any
        rank's part fails, rank 0 runs `on_failure(error or None)` (removes the staging dir; returns the error to
        raise instead, or None), and every rank raises. `started`: when the caller began the save (perf_counter),
        so the logged blocking time covers its part too."""
        t0 = time.perf_counter() if started is None else started
        self.wait()
        writer = dcp.FileSystemWriter(str(tmp / SHARDS), sync_files=True)
        if self.asynchronous:
            future = dcp.async_save(state, storage_writer=writer, process_group=self.group)
            done = self.pool.submit(_after, future, commit, t0) if self.pool is not None else None
            self.blocking_seconds.append(time.perf_counter() - t0)
            self.pending = (step, future, done, on_failure, self.blocking_seconds[-1])
        else:
            error = None
            try:
                dcp.save(state, storage_writer=writer, process_group=self.group)
                if self.rank == 0:
                    commit()
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - raised below on every rank, once all agree
                error = e
            self._agree(step, error, on_failure)  # also the barrier: rank 0 has committed when every rank goes on
            self.blocking_seconds.append(time.perf_counter() - t0)
            self._log(step, self.blocking_seconds[-1], self.blocking_seconds[-1])

    def wait(self) -> None:
        """Block until the save in flight is written by every rank and committed by rank 0."""
        if self.pending is None:
            return
        step, future, done, on_failure, blocking = self.pending
        self.pending = None
        error = None
        try:
            future.result()
            if done is not None:
                done.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - raised below on every rank, once all agree
            error = e
        self._agree(step, error, on_failure)
        self._log(step, blocking, done.result() if done is not None else None)

    def _agree(self, step: int, error: BaseException | None, on_failure) -> None:
        """Every rank learns whether any rank's part of the save failed (a max-reduce); then rank 0 cleans up and
        every rank raises."""
        failed = torch.tensor(float(error is not None))
        if self.world > 1:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if not failed.item():
            return
        replacement = on_failure(error) if self.rank == 0 else None
        if replacement is not None:
            raise replacement from None
        if error is None:
            raise UserError(
                f"another rank failed to write the sharded checkpoint of step {step}; older checkpoints "
                "are intact; see that rank's error, then rerun with resume=true"
            )
        raise error

    def _log(self, step: int, blocking: float, committed_after: float | None) -> None:
        """Rank 0: one line per committed save in `log` (checkpoints.jsonl): seconds the loop was held, and
        seconds from the save's start until its commit (for an asynchronous save: while training went on)."""
        if self.rank == 0 and self.log is not None:
            row = {
                "step": step,
                "asynchronous": self.asynchronous,
                "blocking_s": round(blocking, 4),
                "committed_after_s": None if committed_after is None else round(committed_after, 4),
            }
            with open(self.log, "a") as f:
                f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.wait()
        if self.pool is not None:
            self.pool.shutdown()


def _after(future: Future, commit, t0: float) -> float:
    """Rank 0's background thread: wait for the write, commit; returns seconds since the save started."""
    future.result()  # rank 0's write is done after every rank's (DCP's finish gathers them first)
    commit()
    return time.perf_counter() - t0


def check_shards(tmp: Path, world: int) -> None:
    """Rank 0, before the commit: the metadata and one shard file per rank are there."""
    missing = [f"__{r}_0.distcp" for r in range(world) if not (tmp / SHARDS / f"__{r}_0.distcp").is_file()]
    if not (tmp / SHARDS / ".metadata").is_file():
        missing.append(".metadata")
    if missing:
        raise OSError(f"sharded checkpoint {tmp} lacks {', '.join(missing)}")


def write_model_config(tmp: Path, transformer) -> None:
    """What an export needs besides the trained weights, so it needs no training config: the bare transformer's
    diffusers config (`model_config.json`) and its persistent buffers (`buffers.safetensors`, e.g. SD3's fixed
    position table: FSDP does not shard buffers, and the checkpoint's shards hold parameters only)."""
    write_json_atomic(tmp / "model_config.json", model_config(transformer))
    persistent = set(transformer.state_dict())
    buffers = {n: b.detach().cpu().contiguous() for n, b in transformer.named_buffers() if n in persistent}
    if buffers:
        save_tensors_atomic(buffers, tmp / "buffers.safetensors")


def load_sharded(path: Path, model, trained: dict, ema: dict | None, optimizer) -> bool:
    """Load trained weights, EMA and optimizer state in place from `path`'s shards, at any world size.
    Returns whether the checkpoint had an EMA (False: `ema` was left as it was)."""
    reader = dcp.FileSystemReader(str(path / SHARDS))
    try:
        keys = reader.read_metadata().state_dict_metadata
        has_ema = any(k.startswith("ema.") for k in keys)
        state = sharded_state(model, trained, ema if has_ema else None, optimizer)
        dcp.load(state, storage_reader=reader)
    except Exception as e:  # noqa: BLE001 - a missing key (LoRA vs full), an unreadable shard, ...
        raise UserError(
            f"sharded checkpoint {path} cannot be loaded into this model ({type(e).__name__}: "
            f"{str(e)[:160]}); resume with the model/lora config it was trained with"
        ) from None
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return has_ema


def consolidate(path: Path, which: str = "trained") -> dict[str, torch.Tensor]:
    """Full tensors of `which` ("trained" or "ema") from `path`'s shards, in this process alone: no process
    group, any world size wrote them. Everything is read into host memory once (12B FLUX in float32: 48 GB)."""
    reader = dcp.FileSystemReader(str(path / SHARDS))
    prefix = which + "."
    out = {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(meta, "size") and hasattr(meta, "properties"):
            out[key[len(prefix) :]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not out:
        raise UserError(
            f"checkpoint {path} holds no '{which}' weights"
            + ("; it was trained without EMA (ema_decay = 0): export without --ema" if which == "ema" else "")
        )
    dcp.load({which: out}, storage_reader=reader, no_dist=True)
    return out


def export_transformer(path: Path, target: Path, ema: bool = False, replace_exports: bool = False) -> Path:
    """Write `path`'s (EMA) weights as a diffusers model directory (`config.json` +
    `diffusion_pytorch_model.safetensors`, in the run's model dtype) that `<Model>.from_pretrained` and the
    pipeline (`transformer=`) load. Full fine-tunes only: a LoRA run exports its adapter at the end of the run.
    `target` is checked before anything is read (`model_dir.check_export_target`: new, empty or an earlier export of
    this checkpoint; `replace_exports`: of any checkpoint) and written through a staging folder."""
    state = json.loads((path / "state.json").read_text())
    if state["config"]["lora"]["enabled"]:
        raise UserError(
            f"checkpoint {path} is a LoRA run: its adapter is exported at the end of the run (lora/, "
            "lora_ema/); export writes full fine-tunes"
        )
    mark = export_mark(path, ema, int(state["step"]))
    check_export_target(target, mark, replace_exports, source=path)  # before the long read
    config = json.loads((path / "model_config.json").read_text())
    dtype = getattr(torch, state["config"]["model"]["dtype"])
    weights = consolidate(path, "ema" if ema else "trained")
    if (path / "buffers.safetensors").is_file():
        weights.update(load_file(str(path / "buffers.safetensors")))
    weights = {n: t.to(dtype) for n, t in weights.items()}
    return write_model_dir(weights, config, target, mark, replace_exports, source=path)

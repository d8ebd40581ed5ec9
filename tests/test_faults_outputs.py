"""Fault injection, part 4 (issue 32): what a run writes besides its checkpoints, and the disk failing under any
library. `export --out` never removes what it names; `best/` is verified like a checkpoint; a non-finite validation
score is an error; the validation prompts are compared on resume; the prompt cache is checksummed and re-encoded
when damaged; a disk failure raised as OSError, safetensors' SafetensorError or torch.save's RuntimeError is one
line with its staging folder removed; method settings bounded where the math needs it. Each test injects its case,
then checks for one line (or none), the exit status, and that nothing was lost or silently used."""

import errno
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from leapalign_fast import build
from leapalign_fast import checkpoint as ckpt
from leapalign_fast.cli import main
from leapalign_fast.config import load_config
from leapalign_fast.errors import UserError, disk_failure
from leapalign_fast.models.backbone import backbone_for
from leapalign_fast.prompts import PromptOrder, builtin_prompts, read_prompt_file
from leapalign_fast.resume_settings import prompts_digest
from leapalign_fast.rewards import register_reward
from leapalign_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = str(ROOT / "configs" / "defaults.toml")
FAST = ["batch_size=2", "num_steps=4", "report_to=none", "checkpoint_every=1", "ema_decay=0.9"]
SHARDED = [*FAST, "fsdp=true", "deterministic=true"]
VAL_PROMPTS = "a red square\na blue circle\na green star\n"
ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"  # as seen, 0.8
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # as seen, torch 2.13


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def cli(capsys, command, *argv, defaults=True):
    """(exit status, stdout lines, stderr lines without tqdm's bar)."""
    code = main([command, *(["--config", DEFAULTS, *FAST] if defaults else []), *argv])
    cap = capsys.readouterr()
    err = [line for line in re.split(r"[\r\n]", cap.err) if line.strip() and not line.startswith("train:")]
    return code, cap.out.strip().splitlines(), err


def rows(out: Path, name="metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def strict_rows(path: Path) -> list[dict]:
    """JSON lines parsed strictly: a NaN or Infinity token is an error."""

    def refuse(token):
        raise ValueError(f"{token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def staging_left(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-", ".pin-"))]


def _full_disk_in_io(monkeypatch, when):
    """safetensors' save_file as io.py calls it: for a path `when(path)` accepts, it writes a little, then raises
    the SafetensorError safetensors raises on a full disk (not an OSError)."""
    import leapalign_fast.io as io_mod

    real = io_mod.save_file

    def full(tensors, path, metadata=None):
        if when(str(path)):
            Path(path).write_bytes(b"\0" * 64)
            raise SafetensorError(ENOSPC_SAFETENSORS)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io_mod, "save_file", full)


# ---- one test for "the disk or file system failed" -----------------------------------------------------------


def test_disk_failure_recognises_each_library_and_nothing_else():
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    full = disk_failure(SafetensorError(ENOSPC_SAFETENSORS))
    assert full.errno == errno.ENOSPC
    ro = disk_failure(
        SafetensorError('Error while serializing: I/O error: Read-only file system (os error 30) at path "/x/.tmp1"')
    )
    assert ro.errno == errno.EROFS and ro.filename == "/x/.tmp1"
    assert disk_failure(RuntimeError(TORCH_SHORT_WRITE)).errno == errno.ENOSPC
    opened = RuntimeError(
        "[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only file system"
    )
    assert disk_failure(opened).errno == errno.EROFS
    wrapped = CheckpointException("x", {1: (RuntimeError(TORCH_SHORT_WRITE), traceback.StackSummary())})
    assert disk_failure(wrapped).errno == errno.ENOSPC  # one rank's failure inside DCP's exception
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError:
            raise KeyError("x")  # noqa: B904 - the context is the point
    except KeyError as e:
        assert disk_failure(e).errno == errno.EIO
    for other in (
        SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        ValueError("x"),
    ):
        assert disk_failure(other) is None, other


# ---- export --out --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A one-rank FSDP run with sharded checkpoints step_1 and step_2 (and its end-of-run transformer/ export)."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    train(load_config(None, [f"output_dir={out}", "max_steps=2", *SHARDED]))
    return out


def _export(capsys, ckpt_dir, out=None, *extra):
    argv = ["--checkpoint", str(ckpt_dir), *(["--out", str(out)] if out is not None else []), *extra]
    return cli(capsys, "export", *argv, defaults=False)


@pytest.mark.parametrize("where", ["folder-of-other-files", "run-output-dir", "the-checkpoint", "a-file"])
def test_export_refuses_an_out_that_is_not_an_earlier_export(where, sharded, tmp_path, capsys):
    step2 = sharded / "checkpoints" / "step_00000002"
    target = {
        "folder-of-other-files": tmp_path / "mine",
        "run-output-dir": sharded,
        "the-checkpoint": step2,
        "a-file": tmp_path / "file.bin",
    }[where]
    if where == "folder-of-other-files":
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    if where == "a-file":
        target.write_bytes(b"keep me")
    watched = sharded if where in ("run-output-dir", "the-checkpoint") else tmp_path
    before = digest(watched)
    code, _, err = _export(capsys, step2, target)
    assert code == 2 and len(err) == 1 and "nothing was changed" in err[0], err
    assert digest(watched) == before and not staging_left(watched)
    assert ckpt.verify_checkpoint(step2) is None


def test_export_replaces_only_an_earlier_export_and_force_only_another_export(sharded, tmp_path, capsys):
    step1, step2 = (sharded / "checkpoints" / f"step_{s:08d}" for s in (1, 2))
    out = tmp_path / "exported"
    assert _export(capsys, step2, out)[0] == 0 and json.loads((out / "export.json").read_text())["step"] == 2
    assert _export(capsys, step2, out)[0] == 0  # the same checkpoint again: replaced, no question
    before = digest(out)
    code, _, err = _export(capsys, step1, out)  # another checkpoint's export: not without --force
    assert code == 2 and len(err) == 1 and "pass --force" in err[0] and digest(out) == before, err
    assert _export(capsys, step1, out, "--force")[0] == 0
    assert json.loads((out / "export.json").read_text())["step"] == 1
    (out / "notes.txt").write_text("mine")  # no longer only an export: even --force refuses
    code, _, err = _export(capsys, step2, out, "--force")
    assert code == 2 and "not an export" in err[0] and (out / "notes.txt").read_text() == "mine"
    assert not staging_left(tmp_path)


def test_export_into_a_read_only_parent_is_one_line(sharded, tmp_path, capsys, monkeypatch):
    import leapalign_fast.io as io_mod

    parent = tmp_path / "ro"
    parent.mkdir()
    real = io_mod.tempfile.mkdtemp

    def read_only(*a, dir=None, **kw):  # as root, chmod would not stop the write: the file system's answer
        if dir is not None and Path(dir) == parent:
            raise OSError(errno.EROFS, "Read-only file system", str(parent))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(io_mod.tempfile, "mkdtemp", read_only)
    code, _, err = _export(capsys, sharded / "checkpoints" / "step_00000002", parent / "x")
    assert code == 2 and len(err) == 1 and "Read-only file system" in err[0] and str(parent) in err[0], err
    assert list(parent.iterdir()) == []


def test_export_disk_full_as_safetensor_error_keeps_the_earlier_export(sharded, tmp_path, capsys, monkeypatch):
    step2 = sharded / "checkpoints" / "step_00000002"
    out = tmp_path / "exported"
    assert _export(capsys, step2, out)[0] == 0
    before = digest(out)
    _full_disk_in_io(monkeypatch, lambda p: "exported" in p)
    code, _, err = _export(capsys, step2, out)
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert digest(out) == before and not staging_left(tmp_path)


def test_async_sharded_save_failing_in_torch_save_is_one_line(tmp_path, capsys, monkeypatch):
    """torch.save (DCP's shard writer, in the background thread) raises its RuntimeError on a full disk."""
    from leapalign_fast import dist_checkpoint

    failing, real_save, real_saver = [], torch.save, dist_checkpoint.ShardedSaver.save

    def save(self, tmp, step, *a, **kw):
        if step == 2:
            failing.append(step)
        return real_saver(self, tmp, step, *a, **kw)

    def torch_save(obj, f, *a, **kw):
        if failing:
            raise RuntimeError(TORCH_SHORT_WRITE)
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(dist_checkpoint.ShardedSaver, "save", save)
    monkeypatch.setattr(torch, "save", torch_save)
    argv = [f"output_dir={tmp_path}", "max_steps=2", "async_checkpoint=true", *SHARDED]
    code, _, err = cli(capsys, "train", *argv)
    assert code == 2 and len(err) == 1 and "cannot write checkpoint step 2" in err[0], err
    assert "newest: step_00000001" in err[0] and not staging_left(tmp_path / "checkpoints")
    monkeypatch.undo()
    code, _, err = cli(capsys, "train", *argv, "resume=true")
    assert code == 0 and [r["step"] for r in rows(tmp_path)] == [1, 2], err


def test_the_stale_mesh_warning_of_staged_copies_is_dropped_and_nothing_else(caplog):
    """torch 2.14's DeviceMesh.__setstate__ warning (once per DTensor of a staged copy) is dropped by the filter an
    asynchronous saver installs; another warning of the same logger still reaches the handlers."""
    import logging

    from leapalign_fast import dist_checkpoint

    dist_checkpoint.quiet_stale_mesh_warning()
    dist_checkpoint.quiet_stale_mesh_warning()  # idempotent: one filter
    mesh_log = logging.getLogger("torch.distributed.device_mesh")
    assert sum(isinstance(f, dist_checkpoint._StaleMeshWarning) for f in mesh_log.filters) == 1
    with caplog.at_level(logging.WARNING, logger="torch.distributed.device_mesh"):
        mesh_log.warning(
            "It seems like pickling/unpickling of the DeviceMesh occurred before the PGs were created. This will "
            "cause PG lookup to fail when torch.compile is enabled"
        )
        mesh_log.warning("some other device mesh problem")
    assert [r.getMessage() for r in caplog.records] == ["some other device mesh problem"]


# ---- best/ ---------------------------------------------------------------------------------------------------

NAN_AFTER: dict[str, int] = {}


@register_reward("test_nan_after")
def _nan_after(calls: int = 0):
    """Scores 0.5, then NaN from call `calls` on (a scorer that breaks, or weights that diverge, mid-run)."""

    class NanAfter(torch.nn.Module):
        def forward(self, images, prompts):
            NAN_AFTER["n"] = NAN_AFTER.get("n", 0) + 1
            return torch.full((len(images),), math.nan if NAN_AFTER["n"] > calls else 0.5)

    return NanAfter()


@register_reward("test_rising")
def _rising():
    """A score that rises at every call: every validation is a new best (best/ is swapped each time)."""

    class Rising(torch.nn.Module):
        calls = 0

        def forward(self, images, prompts):
            Rising.calls += 1
            return torch.full((len(images),), float(Rising.calls))

    return Rising()


@register_reward("test_flat")
def _flat(value: float = 0.5):
    class Flat(torch.nn.Module):
        def forward(self, images, prompts):
            return torch.full((len(images),), float(value))

    return Flat()


def _val_args(tmp_path, *extra):
    (tmp_path / "val.txt").write_text(VAL_PROMPTS) if not (tmp_path / "val.txt").exists() else None
    return [f"eval_prompt_file={tmp_path / 'val.txt'}", "eval_every=1", "eval_rewards=['reward']", *extra]


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """A run at step 2 with validation every step: best/ and checkpoints step_1, step_2."""
    d = tmp_path_factory.mktemp("validated")
    out = d / "run"
    train(load_config(None, [f"output_dir={out}", "max_steps=2", *FAST, *_val_args(d)]))
    return d


@pytest.fixture
def val_copy(validated, tmp_path):
    shutil.copytree(validated, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_best_has_a_manifest_and_a_flipped_best_is_refused_then_replaced(val_copy, capsys):
    out, best = val_copy / "run", val_copy / "run" / "best"
    assert ckpt.verify_checkpoint(best) is None and (best / "manifest.json").is_file()
    b = bytearray((best / "trained.safetensors").read_bytes())
    b[len(b) // 2] ^= 0xFF
    (best / "trained.safetensors").write_bytes(bytes(b))
    code, _, err = cli(capsys, "eval", f"output_dir={out}", "--checkpoint", str(best), "--steps", "2")
    assert code == 2 and len(err) == 1 and "is damaged" in err[0] and "does not match its checksum" in err[0], err
    code, lines, err = cli(capsys, "train", f"output_dir={out}", "resume=true", "max_steps=3", *_val_args(val_copy))
    said = [line for line in lines if "best/ is damaged" in line]
    assert code == 0 and len(said) == 1 and "damaged-best" in said[0], (lines, err)
    assert (out / "damaged-best" / "trained.safetensors").read_bytes() == bytes(b)  # kept, never deleted
    assert ckpt.verify_checkpoint(best) is None and json.loads((best / "state.json").read_text())["step"] == 3


def test_nan_validation_score_is_one_error_not_an_early_stop(tmp_path, capsys):
    NAN_AFTER.clear()
    argv = [
        f"output_dir={tmp_path / 'run'}",
        "max_steps=8",
        "early_stop_patience=1",
        *_val_args(
            tmp_path, "eval_rewards=['broken']", "eval_reward_options={broken = {name = 'test_nan_after', calls = 2}}"
        ),
    ]  # the batch of 2 and 3 prompts: validation at step 0 is calls 1-2, step 1 is NaN
    code, _, err = cli(capsys, "train", *argv)
    assert code == 3 and len(err) == 1 and "scorer 'broken'" in err[0] and "step 1" in err[0], err
    got = strict_rows(tmp_path / "run" / "validation.jsonl")  # no NaN token: null
    assert [(r["step"], r["val/broken"]) for r in got] == [(0, 0.5), (1, None)]
    assert json.loads((tmp_path / "run" / "best" / "state.json").read_text())["step"] == 0  # step 0's, untouched
    assert [r["step"] for r in rows(tmp_path / "run")] == [1]  # stopped there, not early-stopped later on


def test_edited_validation_prompts_are_noticed_on_resume(val_copy, capsys):
    out = val_copy / "run"
    (val_copy / "val.txt").write_text("a red square\na yellow ring\n")
    before = digest(out)
    code, _, err = cli(capsys, "train", f"output_dir={out}", "resume=true", "max_steps=3", *_val_args(val_copy))
    assert code == 2 and len(err) == 1 and "the validation prompts" in err[0], err
    after = digest(out)  # every file as it was (the new prompts' embeddings were cached, a new folder)
    assert {k: after.get(k) for k in before} == before and all(
        k.startswith("prompt_cache/") for k in after.keys() - before.keys()
    )
    code, lines, err = cli(
        capsys, "train", f"output_dir={out}", "resume=true", "resume_force=true", "max_steps=3", *_val_args(val_copy)
    )
    said = [line for line in lines if "other validation prompts" in line]
    assert code == 0 and len(said) == 1 and (out / "best-old-prompts" / "state.json").is_file(), (lines, err)
    state = json.loads((out / "best" / "state.json").read_text())
    assert state["step"] == 3 and state["prompts_sha256"] == prompts_digest(read_prompt_file(val_copy / "val.txt"))


def test_disk_full_writing_best_is_one_line_and_staging_removed(val_copy, capsys, monkeypatch):
    out = val_copy / "run"
    _full_disk_in_io(monkeypatch, lambda p: ".tmp-best" in p)
    rising = ["eval_rewards=['up']", "eval_reward_options={up = {name = 'test_rising'}}"]  # step 3 is a new best
    code, _, err = cli(
        capsys, "train", f"output_dir={out}", "resume=true", "max_steps=3", *_val_args(val_copy, *rising)
    )
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0] and ".tmp-best" in err[0], err
    assert not staging_left(out) and ckpt.verify_checkpoint(out / "best") is None
    assert all(ckpt.verify_checkpoint(d) is None for d in ckpt.list_checkpoints(out))
    monkeypatch.undo()
    code, _, err = cli(capsys, "train", f"output_dir={out}", "resume=true", "max_steps=3", *_val_args(val_copy))
    assert code == 0 and [r["step"] for r in rows(out)] == [1, 2, 3], err


def test_a_previous_best_that_cannot_be_deleted_does_not_stop_the_run(tmp_path, capsys, monkeypatch):
    import leapalign_fast.io as io_mod

    real = io_mod.shutil.rmtree

    def undeletable(path, *a, **kw):  # the old best/ resists removal (ENOTEMPTY on the next swap, before)
        if Path(path).name.startswith(".old-best"):
            return None
        return real(path, *a, **kw)

    monkeypatch.setattr(io_mod.shutil, "rmtree", undeletable)
    rising = ["eval_rewards=['up']", "eval_reward_options={up = {name = 'test_rising'}}"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".old-best").mkdir()
    (tmp_path / "run" / ".old-best" / "x").write_text("stuck")  # what made the old code's rename fail (ENOTEMPTY)
    code, lines, err = cli(
        capsys, "train", f"output_dir={tmp_path / 'run'}", "max_steps=3", *_val_args(tmp_path, *rising)
    )
    said = [line for line in lines if "could not be removed" in line]
    assert code == 0 and not err and len(said) == 3, (lines, err)  # steps 1, 2, 3 each swapped a best/ in
    assert ckpt.verify_checkpoint(tmp_path / "run" / "best") is None
    assert json.loads((tmp_path / "run" / "best" / "state.json").read_text())["step"] == 3


def test_resuming_an_early_stopped_run_says_so_and_trains_nothing(tmp_path, capsys):
    argv = [
        f"output_dir={tmp_path / 'run'}",
        "max_steps=20",
        "early_stop_patience=2",
        *_val_args(tmp_path, "eval_rewards=['c']", "eval_reward_options={c = {name = 'test_flat'}}"),
    ]
    assert cli(capsys, "train", *argv)[0] == 0
    before = digest(tmp_path / "run" / "checkpoints")
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2]  # validations 0, 1, 2: two without improvement
    code, lines, err = cli(capsys, "train", *argv, "resume=true")
    said = [line for line in lines if "stopped early at step 2" in line]
    assert code == 0 and len(said) == 1 and not err, (lines, err)
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2] and digest(tmp_path / "run" / "checkpoints") == before
    code, lines, _ = cli(capsys, "train", *argv, "resume=true", "early_stop_patience=3")  # raised: it goes on
    assert code == 0 and [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3]


# ---- the prompt cache ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A run at step 2 with its prompt caches, and the same run resumed to step 3 (the reference)."""
    d = tmp_path_factory.mktemp("cached")
    train(load_config(None, [f"output_dir={d / 'run'}", "max_steps=2", *FAST]))
    shutil.copytree(d / "run", d / "reference")
    train(load_config(None, [f"output_dir={d / 'reference'}", "max_steps=3", "resume=true", *FAST]))
    return d


def _train_cache(out: Path) -> Path:
    cfg = load_config(None, [f"output_dir={out}", *FAST])
    return build.prompt_cache_path(cfg, backbone_for(cfg.model), builtin_prompts()).parent


def _header(path: Path) -> tuple[int, dict]:
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    return 8 + n, json.loads(b[8 : 8 + n])


def _random_data(chunk: Path):
    start, _ = _header(chunk)
    b = chunk.read_bytes()
    chunk.write_bytes(b[:start] + os.urandom(len(b) - start))  # the header kept: it still opens


def _flip_an_undrawn_row(chunk: Path):
    drawn = set(PromptOrder(len(builtin_prompts()), 0, 0).take(2 * 3))  # the 3 steps' prompts (seed 0, batch 2)
    row = max(set(range(len(builtin_prompts()))) - drawn)
    start, header = _header(chunk)
    lo, hi = header["t5"]["data_offsets"]
    at = start + lo + row * (hi - lo) // len(builtin_prompts()) + 8
    b = bytearray(chunk.read_bytes())
    b[at] ^= 0x01
    b[at + 1] ^= 0x01
    chunk.write_bytes(bytes(b))


def _other_set(cache: Path):
    other = next(p for p in cache.parent.iterdir() if p != cache and p.is_dir())  # the eval prompts' cache
    shutil.copy(other / "chunk_00000.safetensors", cache / "chunk_00000.safetensors")


def _legacy(cache: Path):
    index = json.loads((cache / "index.json").read_text())
    del index["sha256"]
    (cache / "index.json").write_text(json.dumps(index))


CACHE_DAMAGE = [
    (
        "truncated-chunk",
        lambda c: (c / "chunk_00000.safetensors").write_bytes((c / "chunk_00000.safetensors").read_bytes()[:500]),
        "does not match",
    ),
    ("deleted-chunk", lambda c: (c / "chunk_00000.safetensors").unlink(), "chunk_00000.safetensors is missing"),
    ("garbage-index", lambda c: (c / "index.json").write_bytes(b"\xff{garbage"), "index.json is unreadable"),
    ("empty-index", lambda c: (c / "index.json").write_text(""), "index.json is unreadable"),
    ("index-of-nothing", lambda c: (c / "index.json").write_text("[]"), "index.json is incomplete"),
    ("chunk-of-another-prompt-set", _other_set, "does not match its checksum"),
    ("random-bytes-header-kept", lambda c: _random_data(c / "chunk_00000.safetensors"), "does not match"),
    ("two-flipped-bytes-undrawn-row", lambda c: _flip_an_undrawn_row(c / "chunk_00000.safetensors"), "does not match"),
    ("written-before-checksums", _legacy, "before the cache had checksums"),
]


@pytest.mark.parametrize("damage", CACHE_DAMAGE, ids=[d[0] for d in CACHE_DAMAGE])
def test_damaged_prompt_cache_is_encoded_again_with_one_line(damage, cached, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(cached / "run", out)
    damage[1](_train_cache(out))
    code, lines, err = cli(capsys, "train", f"output_dir={out}", "resume=true", "max_steps=3")
    said = [line for line in lines if "prompt cache" in line]
    assert code == 0 and not err and len(said) == 1 and damage[2] in said[0], (lines, err)
    timeless = [
        [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows(d)] for d in (out, cached / "reference")
    ]
    assert timeless[0] == timeless[1]  # the same steps as an undamaged resume: the cache was not used as it was
    assert build.check_prompt_cache(_train_cache(out) / "index.json", builtin_prompts()) is None
    assert not staging_left(out / "prompt_cache")


def test_prompt_cache_checksums_are_read_once_per_process(cached, tmp_path, monkeypatch):
    from leapalign_fast.models import text

    out = tmp_path / "run"
    shutil.copytree(cached / "run", out)
    hashed = []
    real = text.digests
    monkeypatch.setattr(text, "digests", lambda paths: hashed.extend(paths) or real(paths))
    text._VERIFIED.clear()
    train(load_config(None, [f"output_dir={out}", "max_steps=3", "resume=true", *FAST]))
    assert len(hashed) == len(set(hashed)) == 2  # each cache's one chunk (training, eval prompts), once


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from leapalign_fast.models.flux import TinyFluxConfig, build_tiny_flux, save_flux

    d = tmp_path_factory.mktemp("flux") / "flux"
    save_flux(build_tiny_flux(TinyFluxConfig(), seed=0), d)
    return d


@pytest.mark.parametrize(
    "where", ["output-dir-a-file", "output-dir-under-a-file", "disk-full", "truncated-text-encoder"]
)
def test_encode_prompts_errors_are_one_line(where, flux_dir, tmp_path, capsys, monkeypatch):
    argv = [f"output_dir={tmp_path / 'out'}"]
    if where.startswith("output-dir"):
        (tmp_path / "afile").write_text("x")
        argv = [f"output_dir={tmp_path / 'afile'}" + ("/sub" if where.endswith("under-a-file") else "")]
    if where == "disk-full":
        _full_disk_in_io(monkeypatch, lambda p: "prompt_cache" in p)
    if where == "truncated-text-encoder":
        shutil.copytree(flux_dir, tmp_path / "flux")
        w = tmp_path / "flux" / "text_encoder" / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        argv.append(f"model.source={tmp_path / 'flux'}")
    code, _, err = cli(capsys, "encode-prompts", *argv)
    want = {"output-dir-a-file": "is not writable", "output-dir-under-a-file": "is not writable"}
    want.update({"disk-full": "No space left on device", "truncated-text-encoder": "cannot load the model"})
    assert code == 2 and len(err) == 1 and want[where] in err[0], err
    if where == "disk-full":
        assert not staging_left(tmp_path / "out")


def test_disk_full_writing_the_prompt_cache_or_a_checkpoint_as_safetensor_error(tmp_path, capsys, monkeypatch):
    _full_disk_in_io(monkeypatch, lambda p: "prompt_cache" in p)
    code, _, err = cli(capsys, "train", f"output_dir={tmp_path}", "max_steps=2")
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert not staging_left(tmp_path) and not ckpt.list_checkpoints(tmp_path)
    monkeypatch.undo()
    _full_disk_in_io(monkeypatch, lambda p: "step_00000002" in p)
    code, _, err = cli(capsys, "train", f"output_dir={tmp_path}", "max_steps=2")
    assert code == 2 and len(err) == 1 and "cannot write checkpoint step 2" in err[0] and "disk is full" in err[0]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"] and not staging_left(tmp_path)
    monkeypatch.undo()
    code, _, err = cli(capsys, "train", f"output_dir={tmp_path}", "max_steps=2", "resume=true")
    assert code == 0 and [r["step"] for r in rows(tmp_path)] == [1, 2], err


def test_disk_full_in_the_lora_export_as_safetensor_error(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):  # diffusers' save_lora_weights calls safetensors directly
        if "lora" in str(filename):
            raise SafetensorError(ENOSPC_SAFETENSORS)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    lora = ["lora.enabled=true", "lora.rank=4"]
    code, _, err = cli(capsys, "train", f"output_dir={tmp_path}", "max_steps=1", *lora)
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert not (tmp_path / "lora").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".lora")]
    assert ckpt.verify_checkpoint(ckpt.list_checkpoints(tmp_path)[-1]) is None


# ---- other inputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "wrong-keys"])
def test_damaged_toy_reward_weights_one_line(kind, tmp_path):
    from leapalign_fast.rewards import build_reward

    path = tmp_path / "toy.safetensors"
    shutil.copy(ROOT / "assets" / "toy" / "reward_0.safetensors", path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(UserError) as e:
        build_reward("toy", path=str(path))
    assert "\n" not in str(e.value) and "reward 'toy'" in str(e.value) and str(path) in str(e.value)


METHOD_BOUNDS = [
    (
        "sparse-late-bias-60",
        ["method.name=flowbp_sparse", "method.late_bias=60"],
        "method.late_bias must be in [0, 41.33]",
    ),
    (
        "bridge-late-bias-60",
        ["method.name=flowbp_bridge", "method.late_bias=60"],
        "method.late_bias must be in [0, 41.33]",
    ),
    (
        "sparse-grad-rescale-2",
        ["method.name=flowbp_sparse", "method.grad_rescale=2"],
        "method.grad_rescale must be in [0, 1]",
    ),
    (
        "lagrange-grad-rescale-huge",
        ["method.name=flowbp_lagrange", "method.grad_rescale=1e30"],
        "grad_rescale must be in [0, 1]",
    ),
    ("lam-huge", ["method.lam=3e38"], "method.lam must be in [-1e+30, 1e+30]"),
]


@pytest.mark.parametrize("case", METHOD_BOUNDS, ids=[c[0] for c in METHOD_BOUNDS])
def test_method_numbers_are_bounded_where_the_math_needs_it(case, tmp_path, capsys):
    code, _, err = cli(capsys, "train", f"output_dir={tmp_path / 'out'}", "num_steps=8", *case[1])
    assert code == 2 and len(err) == 1 and case[2] in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", [4, 8, 25, 50, 1000])
def test_late_bias_bound_is_where_the_draw_breaks(n):
    from leapalign_fast.methods.indices import draw_late_biased
    from leapalign_fast.methods.settings import max_late_bias

    g = torch.Generator().manual_seed(0)
    assert len(draw_late_biased(0, n, 3, max_late_bias(n), g)) == 3  # the bound itself: finite weights
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        draw_late_biased(0, n, 3, 1.1 * max_late_bias(n) + 1, g)  # beyond: the draw the bound keeps out


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    plain, marked = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text("a red square\na blue circle\n", encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_prompt_file(marked) == read_prompt_file(plain) == ["a red square", "a blue circle"]
    assert prompts_digest(read_prompt_file(marked)) == prompts_digest(read_prompt_file(plain))


# ---- eval of a live run's latest -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("live") / "run"
    train(load_config(None, [f"output_dir={out}", "max_steps=2", *FAST]))
    return out


@pytest.mark.parametrize("when", ["while-sampling", "while-pinning"])
def test_eval_of_latest_survives_pruning_under_it(when, two_checkpoints, tmp_path, capsys, monkeypatch):
    """The live run prunes the checkpoint eval chose: after eval pinned it (eval reads the pin), or while eval
    pins it (eval takes the next newest)."""
    import leapalign_fast.evaluate as ev

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    newest = out / "checkpoints" / "step_00000002"
    if when == "while-sampling":
        real = ev.load_components

        def pruned_then_load(*a, **kw):
            shutil.rmtree(newest)  # keep_checkpoints pruning in the live run
            return real(*a, **kw)

        monkeypatch.setattr(ev, "load_components", pruned_then_load)
    else:
        real_pin = ckpt.pin

        def pruned_while_pinning(path):
            if path == newest and newest.exists():
                shutil.rmtree(newest)
            return real_pin(path)

        monkeypatch.setattr(ckpt, "pin", pruned_while_pinning)
    code, lines, err = cli(capsys, "eval", f"output_dir={out}", "--steps", "2")
    assert code == 0 and not err, err
    want = "step_00000002" if when == "while-sampling" else "step_00000001"
    assert json.loads((out / "eval" / want / "scores.json").read_text())["checkpoint"].endswith(want)
    assert not staging_left(out)


def test_eval_encodes_a_damaged_prompt_cache_again(flux_dir, tmp_path, capsys):
    """From a model directory the text encoders load only when a cache needs them: a damaged one must count."""
    (tmp_path / "p.txt").write_text("a red square\na blue circle\n")
    argv = [f"output_dir={tmp_path / 'run'}", f"model.source={flux_dir}", "--checkpoint", "base", "--steps", "2"]
    argv += ["--prompts", str(tmp_path / "p.txt")]
    assert cli(capsys, "eval", *argv)[0] == 0
    first = json.loads((tmp_path / "run" / "eval" / "base" / "scores.json").read_text())
    cache = next((tmp_path / "run" / "prompt_cache").iterdir())
    _random_data(cache / "chunk_00000.safetensors")
    code, lines, err = cli(capsys, "eval", *argv)
    said = [line for line in lines if "prompt cache" in line]
    err = [line for line in err if not line.startswith("Loading weights")]  # transformers' own progress bar
    assert code == 0 and not err and len(said) == 1 and "does not match its checksum" in said[0], (lines, err)
    assert json.loads((tmp_path / "run" / "eval" / "base" / "scores.json").read_text())["scores"] == first["scores"]

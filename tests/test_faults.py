"""Fault injection, part 1: damaged checkpoints, damaged metrics, disk full, non-finite weights, two runs in one
output_dir, changed settings on resume. Each fault ends in one of: the run goes on from an intact state (and
says so in one line), or one line and exit 2 with nothing touched. Never a traceback, lost data or a silent
wrong state."""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from leapalign_fast import checkpoint as ckpt
from leapalign_fast.cli import main
from leapalign_fast.config import load_config
from leapalign_fast.errors import UserError
from leapalign_fast.runlock import RunLock
from leapalign_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
FAST = ["batch_size=2", "num_steps=4", "report_to=none", "checkpoint_every=1", "ema_decay=0.9"]
CLI = ["--config", str(ROOT / "configs" / "defaults.toml"), *FAST]


def digest(root: Path) -> dict[str, str]:
    """Every file's hash, but the lock's holder line (rewritten by whoever holds it last)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def cli(capsys, *argv) -> tuple[int, list[str], list[str]]:
    code = main(["train", *CLI, *argv])
    cap = capsys.readouterr()
    err = [
        line for line in re.split(r"[\r\n]", cap.err) if line.strip() and not line.startswith("train:")
    ]  # tqdm's bar
    return code, cap.out.strip().splitlines(), err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run at step 2 with checkpoints step_1 and step_2."""
    out = tmp_path_factory.mktemp("finished")
    train(load_config(None, [f"output_dir={out}", "max_steps=2", *FAST]))
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _flip(p: Path):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


# How a checkpoint file gets damaged: (id, file, action)
DAMAGE = [
    ("flip-trained", "trained.safetensors", _flip),
    ("truncate-trained", "trained.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    ("empty-trained", "trained.safetensors", lambda p: p.write_bytes(b"")),
    ("other-valid-trained", "trained.safetensors", lambda p: save_file({"x": torch.zeros(2)}, str(p))),
    ("missing-ema", "ema.safetensors", lambda p: p.unlink()),
    ("flip-ema", "ema.safetensors", _flip),
    ("missing-state", "state.json", lambda p: p.unlink()),
    ("garbage-state", "state.json", lambda p: p.write_text("{not json")),
    ("empty-state", "state.json", lambda p: p.write_text("")),
    ("missing-optimizer", "optimizer.safetensors", lambda p: p.unlink()),
    ("garbage-optimizer-json", "optimizer.json", lambda p: p.write_text("[]")),
    ("flip-rng", "rng_rank0.safetensors", _flip),
    ("missing-metrics-copy", "metrics.jsonl", lambda p: p.unlink()),
    ("missing-manifest", "manifest.json", lambda p: p.unlink()),
    ("garbage-manifest", "manifest.json", lambda p: p.write_text("\x00\x01")),
    ("manifest-without-files", "manifest.json", lambda p: p.write_text('{"step": 2}')),
]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(damage, run_copy, finished, capsys):
    _, name, act = damage
    newest = run_copy / "checkpoints" / "step_00000002"
    act(newest / name)
    code, out, err = cli(capsys, f"output_dir={run_copy}", "resume=true", "max_steps=3")
    assert code == 0 and not err, err
    notes = [line for line in out if line.startswith("leapalign-fast: checkpoint")]
    assert len(notes) == 1 and "step_00000002" in notes[0] and "resuming from step_00000001" in notes[0], out
    assert (run_copy / "checkpoints" / "damaged-step_00000002").is_dir()  # kept aside, never deleted
    assert [r["step"] for r in rows(run_copy)] == [1, 2, 3]  # each step exactly once, step 2 re-run
    assert rows(run_copy)[0] == rows(finished)[0]  # the intact history is kept as it was
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["step_00000002", "step_00000003"]
    assert ckpt.verify_checkpoint(run_copy / "checkpoints" / "step_00000003") is None


@pytest.mark.parametrize("damage", DAMAGE[:6], ids=[d[0] for d in DAMAGE[:6]])
def test_no_intact_checkpoint_refuses_in_one_line_and_touches_nothing(damage, run_copy, capsys):
    _, name, act = damage
    for step in (1, 2):
        act(run_copy / "checkpoints" / f"step_{step:08d}" / name)
    before = digest(run_copy)
    code, _, err = cli(capsys, f"output_dir={run_copy}", "resume=true", "max_steps=3")
    assert code == 2 and len(err) == 1 and "no intact checkpoint" in err[0] and "step_00000002" in err[0], err
    assert digest(run_copy) == before


def test_checkpoint_bytes_are_checksummed_in_a_manifest(finished):
    for d in ckpt.list_checkpoints(finished):
        files = json.loads((d / "manifest.json").read_text())["files"]
        assert set(files) == {p.name for p in d.iterdir()} - {"manifest.json"}
        assert ckpt.verify_checkpoint(d) is None


def test_a_step_dir_without_state_json_is_never_deleted_silently(run_copy, capsys):
    (run_copy / "checkpoints" / "step_00000002" / "state.json").unlink()
    code, out, _ = cli(capsys, f"output_dir={run_copy}", "resume=true", "max_steps=2")
    assert code == 0 and any("state.json is missing" in line for line in out)
    assert (run_copy / "checkpoints" / "damaged-step_00000002" / "trained.safetensors").is_file()


# ---- metrics.jsonl -------------------------------------------------------------------------------------------


def _garbage_middle(p: Path):
    lines = p.read_text().splitlines()
    lines[1] = '{"step": 2, "lo'  # a torn row, then more rows after it
    p.write_text("\n".join(lines) + "\n")


METRICS = [
    ("torn-last-line", lambda p: p.write_text(p.read_text()[:-7])),
    ("garbage-middle-line", _garbage_middle),
    ("binary-garbage-appended", lambda p: p.write_bytes(p.read_bytes() + b"\xff\xfe\x00\n")),
    ("deleted", lambda p: p.unlink()),
    ("emptied", lambda p: p.write_text("")),
    ("duplicated-rows", lambda p: p.write_text(p.read_text() * 2)),
    ("rows-beyond-checkpoint", lambda p: p.write_text(p.read_text() + json.dumps({"step": 3, "loss": 0.0}) + "\n")),
]


@pytest.mark.parametrize("damage", METRICS, ids=[m[0] for m in METRICS])
def test_metrics_log_holds_each_step_exactly_once_after_resume(damage, run_copy, finished):
    damage[1](run_copy / "metrics.jsonl")
    train(load_config(None, [f"output_dir={run_copy}", "resume=true", "max_steps=3", *FAST]))
    got = rows(run_copy)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[:2] == rows(finished)  # torn rows regenerated from the checkpoint's copy, not dropped


# ---- disk full while writing a checkpoint ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["save_tensors_atomic", "write_json_atomic", "write_text_atomic"])
def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_older_one(where, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = getattr(ckpt, where)

    def full(*a, **kw):  # ENOSPC for every file of step 2's checkpoint written through `where`
        path = a[1] if where == "save_tensors_atomic" else a[0]
        if "step_00000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(ckpt, where, full)
    code, _, err = cli(capsys, f"output_dir={out}", "max_steps=3")
    assert code == 2 and len(err) == 1 and "the disk is full" in err[0] and "step_00000001" in err[0], err
    assert not list((out / "checkpoints").glob(".tmp-*"))  # staging removed
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000001"]
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step_00000001") is None
    monkeypatch.undo()
    code, _, err = cli(capsys, f"output_dir={out}", "resume=true", "max_steps=3")  # space freed: it goes on
    assert code == 0 and [r["step"] for r in rows(out)] == [1, 2, 3]


def test_unwritable_checkpoint_dir_is_found_at_start(run_copy, capsys, monkeypatch):
    # Tests may run as root, where chmod does not stop writes: inject the refusal at the probe instead.
    real = Path.write_text

    def refuse(self, *a, **kw):
        if self.parent.name == "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", refuse)
    before = digest(run_copy)
    code, _, err = cli(capsys, f"output_dir={run_copy}", "resume=true", "max_steps=4")
    assert code == 2 and len(err) == 1 and "checkpoint directory" in err[0] and "not writable" in err[0], err
    assert digest(run_copy) == before  # refused before any step


# ---- non-finite weights are never checkpointed ----------------------------------------------------------------


def test_weights_poisoned_after_a_good_checkpoint_exit_3_naming_a_finite_one(tmp_path, capsys, monkeypatch):
    real_step, calls = torch.optim.AdamW.step, []

    def poisoned(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls.append(1)
        if len(calls) >= 3:  # the update of step 3 overflows
            for g in self.param_groups:
                for p in g["params"]:
                    p.data.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    code, _, err = cli(capsys, f"output_dir={tmp_path}", "max_steps=6")
    assert code == 3 and len(err) == 1, err
    assert "non-finite at step 3" in err[0] and "Last good checkpoint: " in err[0] and "step_00000002" in err[0]
    for d in ckpt.list_checkpoints(tmp_path):
        for name in ("trained.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(str(d / name)).values()), (d, name)


def test_max_grad_norm_zero_means_no_clipping(tmp_path):
    res = train(load_config(None, [f"output_dir={tmp_path}", "max_steps=2", "max_grad_norm=0", *FAST]))
    assert res.steps == 2 and all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows(tmp_path))


# ---- one run per output_dir -------------------------------------------------------------------------------------


def test_second_run_into_a_locked_output_dir_is_refused(run_copy, capsys):
    staging = run_copy / "checkpoints" / ".tmp-step_00000003"
    staging.mkdir()  # the live run's checkpoint being written
    before = digest(run_copy)
    with RunLock(run_copy):
        for extra in ([], ["resume=true"]):
            code, _, err = cli(capsys, f"output_dir={run_copy}", "max_steps=4", *extra)
            assert code == 2 and len(err) == 1 and "in use by another run" in err[0] and f"pid {os.getpid()}" in err[0]
    assert staging.is_dir() and digest(run_copy) == before


def test_lock_of_a_killed_process_is_free(tmp_path, capsys):
    code = (
        f"from leapalign_fast.runlock import RunLock; import os, signal; RunLock({str(tmp_path)!r}).acquire(); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL and "pid" in (tmp_path / ".lock").read_text()
    code, _, err = cli(capsys, f"output_dir={tmp_path}", "max_steps=1")
    assert code == 0 and not err


def test_lock_is_released_after_a_failed_run(tmp_path, capsys):
    code, _, err = cli(capsys, f"output_dir={tmp_path}", "max_steps=1", "reward.name=nope")
    assert code == 2
    code, _, err = cli(capsys, f"output_dir={tmp_path}", "max_steps=1")
    assert code == 0 and not err


# ---- settings that change on resume ------------------------------------------------------------------------------


def test_resume_force_applies_the_new_optimizer_settings(run_copy, capsys):
    code, out, err = cli(
        capsys,
        f"output_dir={run_copy}",
        "resume=true",
        "resume_force=true",
        "max_steps=3",
        "lr=5e-4",
        "weight_decay=0.01",
        "adam_eps=1e-6",
        "adam_betas=[0.8, 0.99]",
    )
    assert code == 0, err
    changes = [line for line in out if "resume_force: optimizer now uses" in line]
    assert len(changes) == 4 and any("lr 0.001 -> 0.0005" in c for c in changes)
    assert rows(run_copy)[-1]["lr"] == 5e-4  # logged value == used value
    opt = json.loads((run_copy / "checkpoints" / "step_00000003" / "optimizer.json").read_text())["param_groups"][0]
    assert (opt["lr"], opt["weight_decay"], opt["eps"], opt["betas"]) == (5e-4, 0.01, 1e-6, [0.8, 0.99])


def test_resume_with_warmup_change_uses_the_new_schedule(run_copy, capsys):
    code, out, err = cli(
        capsys, f"output_dir={run_copy}", "resume=true", "resume_force=true", "max_steps=3", "warmup_steps=10"
    )
    assert code == 0, err
    assert any("lr 0.001 -> 0.0003" in line and "warm-up" in line for line in out), out  # step 3 runs at 3/10
    assert rows(run_copy)[-1]["lr"] == pytest.approx(1e-3 * 4 / 10)  # as a straight run logs it after step 3


def test_edited_prompt_file_is_noticed_on_resume(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\na blue circle\n")
    out = tmp_path / "run"
    assert cli(capsys, f"output_dir={out}", f"prompt_file={prompts}", "max_steps=1")[0] == 0
    prompts.write_text("a red square\na green circle\n")
    before = digest(out / "checkpoints")
    code, _, err = cli(capsys, f"output_dir={out}", f"prompt_file={prompts}", "max_steps=2", "resume=true")
    assert code == 2 and len(err) == 1 and "training prompts (file content changed)" in err[0], err
    assert digest(out / "checkpoints") == before
    code, _, err = cli(
        capsys, f"output_dir={out}", f"prompt_file={prompts}", "max_steps=2", "resume=true", "resume_force=true"
    )
    assert code == 0, err


def test_ema_enabled_on_resume_starts_from_the_resumed_weights(tmp_path, capsys):
    assert cli(capsys, f"output_dir={tmp_path}", "max_steps=1", "ema_decay=0")[0] == 0
    code, out, err = cli(capsys, f"output_dir={tmp_path}", "max_steps=1", "resume=true", "resume_force=true")
    assert code == 0 and any("the EMA starts from its weights" in line for line in out), (out, err)


# ---- what a resume says ----------------------------------------------------------------------------------------


def test_resume_on_an_empty_dir_says_it_starts_from_zero(tmp_path, capsys):
    code, out, _ = cli(capsys, f"output_dir={tmp_path}", "resume=true", "max_steps=1")
    assert code == 0 and any("no checkpoint" in line and "starting from step 0" in line for line in out)


@pytest.mark.parametrize("max_steps", [1, 2])
def test_resume_at_or_past_max_steps_says_nothing_to_train(max_steps, run_copy, capsys):
    before = digest(run_copy / "checkpoints")
    code, out, err = cli(capsys, f"output_dir={run_copy}", "resume=true", f"max_steps={max_steps}")
    assert code == 0 and not err
    assert any("nothing to train" in line for line in out) and any(
        line.startswith("done: no step to run") for line in out
    )
    assert digest(run_copy / "checkpoints") == before


def test_closing_line_counts_only_the_steps_run(run_copy, capsys):
    code, out, _ = cli(capsys, f"output_dir={run_copy}", "resume=true", "max_steps=4")
    assert code == 0 and out[-1].startswith("done: steps 3-4 in "), out


def test_user_error_type_is_the_one_caught(run_copy):
    with pytest.raises(UserError, match="no intact checkpoint"):
        for d in ckpt.list_checkpoints(run_copy):
            (d / "manifest.json").unlink()
        ckpt.choose_checkpoint(run_copy)


@pytest.mark.slow  # a second interpreter trains meanwhile: ~6 s alone, more on a loaded machine
def test_two_real_runs_into_one_output_dir(tmp_path, capsys):
    """A live CLI run holds the lock: a second run (fresh or resume) is refused and the live one ends intact."""
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "leapalign_fast.cli",
            "train",
            *CLI,
            f"output_dir={tmp_path}",
            "max_steps=100000",
            "checkpoint_every=3",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not ckpt.list_checkpoints(tmp_path) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        for extra in ([], ["resume=true"]):
            code, _, err = cli(capsys, f"output_dir={tmp_path}", "max_steps=4", *extra)
            assert code == 2 and len(err) == 1 and f"pid {first.pid}" in err[0], err
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 75, err[-2000:]
    steps = [r["step"] for r in rows(tmp_path)]
    assert steps == list(range(1, steps[-1] + 1))  # one run's rows, each step once
    assert ckpt.verify_checkpoint(ckpt.list_checkpoints(tmp_path)[-1]) is None


def test_sigkill_while_the_manifest_is_written_leaves_the_older_checkpoint(tmp_path, capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "leapalign_fast.cli", "train", *CLI, f"output_dir={tmp_path}", "max_steps=3"],
        cwd=ROOT,
        env={**os.environ, ckpt.FAULT_ENV: "checkpoint_manifest:2"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]  # step 2 never renamed in
    code, _, err = cli(capsys, f"output_dir={tmp_path}", "resume=true", "max_steps=3")
    assert code == 0 and not err and [r["step"] for r in rows(tmp_path)] == [1, 2, 3]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow  # a launch of two processes (~16-25 s on 2 loaded cores)
def test_damaged_checkpoint_falls_back_under_two_processes(tmp_path):
    def launch(*args):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29900 + os.getpid() % 90),
            str(ROOT / "tests" / "ddp_worker.py"),
            f"output_dir={tmp_path}",
            *FAST,
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    train(load_config(None, [f"output_dir={tmp_path}", "max_steps=2", *FAST]))  # in-process: the fault is on resume
    _flip(tmp_path / "checkpoints" / "step_00000002" / "trained.safetensors")
    proc = launch("max_steps=3", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("is damaged") == 1  # said once, by rank 0
    assert (tmp_path / "checkpoints" / "damaged-step_00000002").is_dir()
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]


def test_checkpoint_from_before_checksums_still_resumes(run_copy, capsys):
    for d in ckpt.list_checkpoints(run_copy):  # as an older version wrote them: no manifest, no mark
        (d / "manifest.json").unlink()
        state = json.loads((d / "state.json").read_text())
        del state["checksummed"]
        (d / "state.json").write_text(json.dumps(state))
    code, out, err = cli(capsys, f"output_dir={run_copy}", "resume=true", "max_steps=3")
    assert code == 0 and not err and not any("damaged" in line for line in out if "checkpoint" in line[:30])
    assert [r["step"] for r in rows(run_copy)] == [1, 2, 3]


def _full_disk_in(monkeypatch, module_attr: str, after_calls: int):
    """Make the writer `module_attr` of the trainer (`leapalign_fast.train`; its checkpointer's `export_lora`)
    fail with ENOSPC from its `after_calls`-th call on."""
    import builtins

    import leapalign_fast.checkpoint as ckpt_mod
    import leapalign_fast.train as train_mod

    owner = ckpt_mod if module_attr == "export_lora" else train_mod
    real = getattr(owner, module_attr, None) or getattr(builtins, module_attr)
    calls = []

    def full(*a, **kw):
        target = str(a[0]) if a and isinstance(a[0], (str, Path)) else ""
        if module_attr != "open" or (target.endswith("metrics.jsonl") and "a" in (a[1] if len(a) > 1 else "")):
            calls.append(1)
            if len(calls) >= after_calls:
                raise OSError(errno.ENOSPC, "No space left on device", target or module_attr)
        return real(*a, **kw)

    monkeypatch.setattr(owner, module_attr, full, raising=False)


@pytest.mark.parametrize("writer", ["open", "save_grid", "export_lora"])
def test_disk_full_outside_a_checkpoint_is_one_line_and_loses_nothing(writer, tmp_path, capsys, monkeypatch):
    _full_disk_in(monkeypatch, writer, after_calls=2 if writer == "open" else 1 if writer == "export_lora" else 2)
    extra = ["lora.enabled=true", "lora.rank=4"] if writer == "export_lora" else []
    code, _, err = cli(capsys, f"output_dir={tmp_path}", "max_steps=3", *extra)
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    monkeypatch.undo()
    for d in ckpt.list_checkpoints(tmp_path):
        assert ckpt.verify_checkpoint(d) is None
    code, _, err = cli(capsys, f"output_dir={tmp_path}", "resume=true", "max_steps=3", *extra)
    assert code == 0 and [r["step"] for r in rows(tmp_path)] == [1, 2, 3], err

"""The GPU check: bench/gpu_prepare.sh and bench/gpu_run.sh parse; `gpu_run.sh --cpu-check call1 call2` runs both
device calls' stages in priority order at toy size on CPU, writing every row to $OUT/results.jsonl as it comes;
a run stopped from outside mid-stage keeps what finished; the checkout is imported before anything installed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
CALL1, CALL2 = ["doctor", "memory", "kernels", "tests"], ["sampler", "train", "train-compiled"]


def _env(tmp_path, **extra):
    return dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        GPU_WORK=str(tmp_path / "work"),
        GPU_SITE=str(tmp_path / "site"),
        PYTHON=sys.executable,
        **extra,
    )


def _rows(tmp_path):
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]  # every line whole: each row is written and fsynced at once


def test_scripts_parse():
    for script in ("gpu_prepare.sh", "gpu_run.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], check=True)


def test_prepare_dry_run_names_the_missing_wheels_and_not_the_project():
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_prepare.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHON=sys.executable),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip download" in proc.stdout and "diffusers==" in proc.stdout and "tomli_w==" in proc.stdout
    assert "pip wheel" not in proc.stdout  # the checkout travels and is imported first: no project wheel to go stale


@pytest.mark.slow
def test_cpu_check_runs_both_calls_in_priority_order(tmp_path):
    """Both calls at toy size; a stale project copy in the wheel folder (a module file, which the cleanup of an
    older call's package folder leaves) must not be what runs: the checkout comes first on PYTHONPATH."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "leapalign_fast.py").write_text("raise ImportError('a stale install shadows the checkout')\n")
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_run.sh"), "--cpu-check", "call1", "call2"],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(tmp_path)
    env = next(r for r in rows if r["bench"] == "environment")
    assert env["torch"] and Path(env["leapalign_fast"]) == (ROOT / "leapalign_fast").resolve()
    stages = [r for r in rows if r["bench"] == "stage"]
    assert [r["stage"] for r in stages] == CALL1 + CALL2 and all(r["status"] == "ok" for r in stages), stages
    order = [r["bench"] for r in rows if r["bench"] not in ("environment", "carry")]
    assert order.index("memory") < order.index("kernels") < order.index("sampler")  # rows land as they come
    carry = next(r for r in rows if r["bench"] == "carry")
    assert carry["fits"] and carry["limit_mib"] == 64 and carry["files"] > 100
    memory = [r for r in rows if r["bench"] == "memory"]
    assert [(r["method"], r["num_steps"]) for r in memory] == [("leapalign", 2), ("full", 2)]
    assert {r.get("tensor_mib", 0) > 0.2 for r in rows if r["bench"] == "kernels"} == {True, False}
    data = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert data["dry_run"] and [c["stage"] for c in data["commands"]] == CALL1 + CALL2
    assert set(data["results"]) == {"carry", "memory", "kernels", "sampler"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "CPU check" in summary and "### memory" in summary and "pytest -m gpu" in summary
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what a device call sends back: at most 8 files


def _start(tmp_path, stages):
    return subprocess.Popen(
        ["bash", str(ROOT / "bench" / "gpu_run.sh"), "--cpu-check", *stages],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(tmp_path),
        start_new_session=True,
    )


def _wait_for_stage(tmp_path, proc, name, timeout=300):
    log = tmp_path / "out" / "gpu_run.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and f"== {name} " in log.read_text():
            return
        assert proc.poll() is None, "the run ended before the stage began"
        time.sleep(0.2)
    raise AssertionError(f"stage {name} did not begin in {timeout} s")


def _tree(pid):
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_stopped_with_sigkill_during_stage_two_keeps_stage_one(tmp_path):
    """Everything killed at once (a device call past its limit): stage 1's rows and summary are on disk."""
    proc = _start(tmp_path, ["kernels", "tests"])
    try:
        _wait_for_stage(tmp_path, proc, "tests")
    finally:
        procs = _tree(proc.pid)
        for p in procs:  # freeze first, so nothing forks while the tree is killed
            p.suspend()
        for p in _tree(proc.pid):
            p.kill()
        proc.wait(timeout=30)
    rows = _rows(tmp_path)
    assert len([r for r in rows if r["bench"] == "kernels"]) == 6  # 3 shapes x 2 implementations
    assert [(r["stage"], r["status"]) for r in rows if r["bench"] == "stage"] == [("kernels", "ok")]
    assert "| kernels | ok (0) |" in (tmp_path / "out" / "summary.md").read_text()
    assert "gpu_run: done" not in (tmp_path / "out" / "gpu_run.log").read_text()


@pytest.mark.slow
def test_stopped_with_sigterm_during_stage_two_records_it_and_leaves_no_process(tmp_path):
    proc = _start(tmp_path, ["kernels", "tests"])
    try:
        _wait_for_stage(tmp_path, proc, "tests")
        children = _tree(proc.pid)[1:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, alive
    finally:
        for p in _tree(proc.pid):
            p.kill()
    stages = [(r["stage"], r["status"]) for r in _rows(tmp_path) if r["bench"] == "stage"]
    assert stages == [("kernels", "ok"), ("tests", "stopped")]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| kernels | ok (0) |" in summary and "| tests | stopped (143) |" in summary


@pytest.mark.slow
def test_stages_the_budget_cannot_reach_are_recorded_as_skipped(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_run.sh"), "--cpu-check", "kernels", "sampler"],
        capture_output=True,
        text=True,
        env=_env(tmp_path, GPU_BUDGET_S="5"),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # two stages not run: two failures
    stages = [(r["stage"], r["status"]) for r in _rows(tmp_path) if r["bench"] == "stage"]
    assert stages == [("kernels", "skipped"), ("sampler", "skipped")]
    assert "skipped" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.slow
def test_gpu_train_steps_path_on_cpu(tmp_path):
    """bench/gpu_train_steps.py: the trainer on random weights with the FLUX LoRA config, at toy size on CPU; a
    row per finished step reaches the JSONL while the run goes on, then the result."""
    sys.path.append(str(ROOT))
    from bench import gpu_train_steps

    jsonl = tmp_path / "rows.jsonl"
    argv = ["--model", "random-tiny", "--steps", "2", "--set", 'model.compile="none"', "--out", str(tmp_path)]
    assert gpu_train_steps.main([*argv, "--jsonl", str(jsonl)]) == 0
    data = json.loads((tmp_path / "train_steps_random-tiny_cpu.json").read_text())
    assert data["steps"] == 2 and len(data["step_seconds"]) == 2 and data["config"]["lora"]["enabled"]
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [r["step"]["step"] for r in rows[:2]] == [1, 2] and rows[2]["steps"] == 2
    assert all(r["bench"] == "train_steps" and r["compile"] == "none" for r in rows)

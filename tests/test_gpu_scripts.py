"""The one GPU command: bench/gpu_prepare.sh and bench/gpu_run.sh parse, and their dry run on CPU runs every
command they would run on the GPU in its parse/plan form (pytest collection, --help after the real arguments,
--dry-run plans), then writes the summary files."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scripts_parse():
    for script in ("gpu_prepare.sh", "gpu_run.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], check=True)


def test_prepare_dry_run_names_the_missing_wheels():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_prepare.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip download" in proc.stdout and "diffusers==" in proc.stdout and "tomli_w==" in proc.stdout
    assert "pip wheel" in proc.stdout


def test_gpu_run_dry_run(tmp_path):
    env = dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        GPU_WORK=str(tmp_path / "work"),
        GPU_SITE=str(tmp_path / "site"),
        PYTHON=sys.executable,
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_run.sh"), "--dry-run"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert data["dry_run"] and data["environment"]["torch"]
    assert [c["stage"] for c in data["commands"]] == ["tests", "train", "memory", "kernels", "sampler"]
    assert all(c["status"] == "ok" for c in data["commands"]), data["commands"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "dry run" in summary and "bench/memory.py" in summary


def test_gpu_train_steps_path_on_cpu(tmp_path):
    """bench/gpu_train_steps.py: the trainer on random weights with the FLUX LoRA config, at toy size on CPU."""
    sys.path.append(str(ROOT))
    from bench import gpu_train_steps

    assert (
        gpu_train_steps.main(
            ["--model", "random-tiny", "--steps", "2", "--set", 'model.compile="none"', "--out", str(tmp_path)]
        )
        == 0
    )
    data = json.loads((tmp_path / "train_steps_random-tiny_cpu.json").read_text())
    assert data["steps"] == 2 and len(data["step_seconds"]) == 2 and data["config"]["lora"]["enabled"]


def test_gpu_run_records_the_stages_its_budget_cannot_reach(tmp_path):
    env = dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        GPU_WORK=str(tmp_path / "work"),
        GPU_SITE=str(tmp_path / "site"),
        PYTHON=sys.executable,
        GPU_BUDGET_S="5",
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_run.sh"), "--dry-run", "kernels", "sampler"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # two stages not run: two failures
    data = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert [(c["stage"], c["status"]) for c in data["commands"]] == [("kernels", "skipped"), ("sampler", "skipped")]
    assert "skipped" in (tmp_path / "out" / "summary.md").read_text()

"""`leapalign-fast doctor` on CPU: exit 0 on a healthy tiny config; on a problem of each kind it checks, that check
fails with one line saying the fix, and the exit status is 2. Problems come in through the config, the environment
and the files (a perturbed kernel, a damaged prompt cache, a missing model folder, an unreachable rendezvous); only
the machine's free disk and free device memory, which a test cannot shrink, are measured by a replaced function."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import hub_cache
import pytest
import test_hub

from leapalign_fast import doctor, doctor_job, doctor_machine
from leapalign_fast.config import load_config

cache, flux_dir, hub_server = test_hub.cache, test_hub.flux_dir, test_hub.hub_server  # their fixtures

ROOT = Path(__file__).resolve().parent.parent
TINY = ["batch_size=2", "num_steps=4", "report_to=none"]
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU doctor interprets the kernels (tests/conftest.py)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", *TINY, *extra])


def _doctor(cfg, capsys, timeout_s: float = 60.0):
    """(exit status, {check: status}, the failure lines) of `doctor.main`."""
    rc = doctor.main(cfg, timeout_s)
    out, err = capsys.readouterr()
    rows = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1] in doctor_machine.STATUSES:
            rows[parts[0]] = parts[1]
    return rc, rows, [line for line in err.splitlines() if line.startswith("leapalign-fast doctor:")]


def _one_failure(cfg, capsys, check: str, fix: str, **kw) -> dict:
    rc, rows, failures = _doctor(cfg, capsys, **kw)
    assert rc == 2 and rows[check] == "fail", rows
    assert len(failures) == 1 and failures[0].startswith(f"leapalign-fast doctor: {check} failed: "), failures
    assert fix in failures[0], failures
    return rows


@pytest.mark.slow  # two processes, each importing the stack: about 15 s of CPU
def test_the_command_passes_a_healthy_tiny_config_under_torchrun(tmp_path):
    """The CLI as a user runs it, launched on 2 ranks: every CPU check ok, the all_reduce across both ranks, exit 0
    on each, the table from rank 0 only, nothing written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the command chooses the interpreter itself on a machine without a GPU
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    proc = subprocess.run(
        [*launch, "-m", "leapalign_fast.cli", "doctor", f"output_dir={tmp_path / 'run'}", *TINY],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    assert table.count("check ") == 1  # rank 0's table only
    for check in ("devices", "dtype", "versions", "attention", "weights", "prompts", "memory", "disk", "trackers"):
        assert f"\n{check} " in table, check
    for kernel in ("connect", "connect_discount", "similarity_weight"):
        assert f"kernel:{kernel}" in table and "interpreted (TRITON_INTERPRET=1)" in table
    assert "gloo all_reduce over 2 ranks" in table and "doctor: nothing failed" in table
    assert not (tmp_path / "run").exists()


def test_healthy_in_one_process_says_what_it_skipped(tmp_path, capsys):
    rc, rows, failures = _doctor(_cfg(tmp_path), capsys)
    assert rc == 0 and not failures and rows["collective"] == "skipped"
    assert set(rows.values()) <= {"ok", "skipped", "warn"} and rows["prompts"] == "warn"  # not encoded yet


def test_a_perturbed_kernel_fails(tmp_path, capsys, monkeypatch):
    from leapalign_fast.kernels import similarity

    real = similarity.similarity_weight_triton
    monkeypatch.setattr(similarity, "similarity_weight_triton", lambda d_j, d_0, tau: real(d_j, d_0, tau) * 1.001)
    rows = _one_failure(_cfg(tmp_path), capsys, "kernel:similarity_weight", "computes wrong values on this device")
    assert rows["kernel:connect"] == rows["kernel:connect_discount"] == "ok"


def test_a_perturbed_connector_gradient_fails(tmp_path, capsys, monkeypatch):
    from leapalign_fast.kernels import connector

    real = connector.connect_backward
    monkeypatch.setattr(connector, "connect_backward", lambda *a: real(*a) * (1 + 1e-3))
    _one_failure(_cfg(tmp_path), capsys, "kernel:connect_discount", "computes wrong values")


def test_too_little_disk_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(doctor_job, "free_disk_bytes", lambda path: 10_000)
    _one_failure(_cfg(tmp_path), capsys, "disk", "lower keep_checkpoints")


def test_too_little_device_memory_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(doctor_job, "free_device_bytes", lambda device: 1 << 20)
    _one_failure(_cfg(tmp_path), capsys, "memory", "lower batch_size")


def test_a_missing_model_folder_fails_and_skips_what_needs_it(tmp_path, capsys):
    rows = _one_failure(_cfg(tmp_path, f"model.source={tmp_path / 'FLUX.1-dev'}"), capsys, "weights", "download it")
    assert rows["memory"] == rows["disk"] == "skipped"


def test_a_stale_prompt_cache_fails(tmp_path, capsys):
    from leapalign_fast.build import encode_prompt_cache

    cfg = _cfg(tmp_path)
    paths = encode_prompt_cache(cfg)
    rc, rows, failures = _doctor(cfg, capsys)
    assert rc == 0 and rows["prompts"] == "ok" and not failures
    chunk = next(p for p in paths[0].parent.iterdir() if p.suffix == ".safetensors")
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last row of the embeddings
    chunk.write_bytes(bytes(data))
    _one_failure(cfg, capsys, "prompts", "rerun `leapalign-fast encode-prompts`")


def test_an_unreachable_collective_fails(tmp_path, capsys, monkeypatch):
    """WORLD_SIZE=2 with only this rank started: the rendezvous times out."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    rc, rows, failures = _doctor(_cfg(tmp_path), capsys, timeout_s=2)
    assert rc == 2 and rows["collective"] == "fail" and len(failures) == 1
    assert failures[0].startswith("leapalign-fast doctor: rank 0: collective failed: every rank must start")
    monkeypatch.setenv("RANK", "2")  # a rank outside the world: said without waiting
    assert (
        "RANK=2 is outside WORLD_SIZE=2"
        in doctor_machine.check_collective(doctor_machine.Context(_cfg(tmp_path), 2)).detail
    )


def test_config_problems_each_fail_their_check(tmp_path, capsys, monkeypatch):
    """attention, dtype, versions and trackers: each injected through the config, the environment or the data."""
    _one_failure(_cfg(tmp_path, "model.attention=flash"), capsys, "attention", "set model.attention")
    # bf16 where the device has none (a GPU before Ampere): the measurement is what a CPU cannot show
    monkeypatch.setattr(
        doctor_machine, "dtype_support", lambda device: {"bfloat16": False, "float32": True, "tf32": False}
    )
    check = doctor_machine.check_dtype(doctor_machine.Context(_cfg(tmp_path, "model.dtype=bfloat16"), 2))
    assert check.status == "fail" and "bfloat16 does not run on cpu" in check.detail
    check = doctor_machine.check_versions(doctor_machine.Context(_cfg(tmp_path), 2), ["torch>=99", "numpy"])
    assert check.status == "fail" and check.detail.startswith("torch: wants >=99, has ")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    _one_failure(_cfg(tmp_path, "report_to=wandb"), capsys, "trackers", "`wandb login`")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert doctor_machine.check_trackers(doctor_machine.Context(_cfg(tmp_path, "report_to=wandb"), 2)).status == "ok"


def test_a_hub_id_in_the_cache_is_present(tmp_path, capsys, cache, flux_dir, monkeypatch):
    """model.source as a Hub id, from a cache laid out as huggingface_hub lays it out (offline): every check passes,
    the text encoders found there too (no prompt is cached yet)."""
    hub_cache.add_folder(cache, test_hub.REPO, flux_dir)
    rc, rows, failures = _doctor(_cfg(tmp_path, f"model.source={test_hub.REPO}"), capsys)
    assert rc == 0 and rows["weights"] == rows["text-encoders"] == rows["memory"] == "ok", (rows, failures)


def test_a_gated_hub_id_fails(tmp_path, capsys, hub_server):
    """The Hub (a local stand-in) refuses the repository: the weights check fails with the fix, nothing waits on it."""
    hub_server.answer = (403, "GatedRepo")
    rows = _one_failure(_cfg(tmp_path, "model.source=org/gated"), capsys, "weights", "accept org/gated's license")
    assert rows["memory"] == rows["disk"] == "skipped"


def test_reward_weights_and_a_prompt_set_by_name(tmp_path, capsys, cache):
    """A reward with no options is checked at its published repository (here in an offline cache laid out as
    huggingface_hub lays it out); not cached, it fails with the download to run; a published prompt set too."""
    from leapalign_fast.rewards.clip_rewards import CLIP_L

    files = {"config.json": b"{}", "tokenizer.json": b"{}", "model.safetensors": b"weights"}
    cfg = _cfg(tmp_path, "reward.name=clip", "reward.options={}")
    _one_failure(cfg, capsys, "reward-weights", f"`hf download {CLIP_L}`")
    hub_cache.add_repo(cache, CLIP_L, files)
    rc, rows, failures = _doctor(cfg, capsys)
    assert rc == 0 and rows["reward-weights"] == "ok", failures
    cfg = _cfg(tmp_path, "prompts=hpdv2-train", "reward.name=colour")
    _one_failure(cfg, capsys, "prompts", "`hf download zhwang/HPDv2 --repo-type dataset`")

"""Start-up on a shared CPU: config errors before torch is imported, passive OpenMP waiting, thread log line."""

import subprocess
import sys
from pathlib import Path

from leapalign_fast.threads import configure_threads, describe_threads

ROOT = Path(__file__).resolve().parent.parent


def test_config_errors_come_before_the_heavy_imports():
    # torch itself is imported (the method settings live beside their losses); the model stack is not.
    code = ("import sys\nfrom leapalign_fast.cli import main\nrc = main(['train', 'lr=abc'])\n"
            "heavy = sorted(m for m in ('diffusers', 'transformers', 'accelerate', 'peft') if m in sys.modules)\n"
            "print('heavy:', heavy)\nsys.exit(rc)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "config key 'lr' must be a float" in proc.stderr and "heavy: []" in proc.stdout


def test_passive_waiting_by_default_and_logged(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    configure_threads()  # (torch is imported in this process already, so here it only sets the variable)
    assert "OMP_WAIT_POLICY=PASSIVE" in describe_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    configure_threads()
    assert "OMP_WAIT_POLICY=ACTIVE" in describe_threads()  # the user's choice wins

"""Start-up on a shared CPU: config errors before torch is imported, passive OpenMP waiting, thread log line."""

import subprocess
import sys
from pathlib import Path

from leapalign_fast.threads import configure_threads, describe_threads

ROOT = Path(__file__).resolve().parent.parent


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    """`main(argv)` in a fresh process; prints which heavy modules were imported by the time it returned."""
    code = (
        f"import sys\nfrom leapalign_fast.cli import main\nrc = main({argv!r})\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'peft') if m in sys.modules)\n"
        "print('heavy:', heavy)\nsys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_config_errors_come_before_the_heavy_imports():
    proc = _cli(["train", "lr=abc"])  # the config alone: not even torch
    assert proc.returncode == 2, proc.stderr
    assert "config key 'lr' must be a float" in proc.stderr and "heavy: []" in proc.stdout
    proc = _cli(["train", "method.name=leapalgn"])  # the method's name is checked by the config too
    assert proc.returncode == 2 and "unknown method 'leapalgn'" in proc.stderr and "heavy: []" in proc.stdout
    # The method's own keys and values: its settings dataclass is torch-free (methods/settings.py), so these too
    # fail before torch is imported.
    proc = _cli(["train", "method.alhpa=0.1"])
    assert proc.returncode == 2 and "did you mean 'method.alpha'" in proc.stderr, proc.stderr
    assert "heavy: []" in proc.stdout
    proc = _cli(["train", "method.alpha=1.5"])
    assert proc.returncode == 2 and "method.alpha must be in [0, 1]" in proc.stderr and "heavy: []" in proc.stdout


def test_config_is_a_leaf():
    """`leapalign_fast.config` imports nothing of the package but UserError, the Hub-id parser (`hub`, standard library
    only until something is resolved) and the method settings (the `methods` package, torch-free until a loss module
    is asked for), and neither torch nor huggingface_hub."""
    code = (
        "import sys\nimport leapalign_fast.config\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('leapalign_fast', 'torch', 'huggingface_hub')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert eval(proc.stdout) == [
        "leapalign_fast",
        "leapalign_fast.config",
        "leapalign_fast.errors",
        "leapalign_fast.hub",
        "leapalign_fast.methods",
        "leapalign_fast.methods.settings",
    ]


def test_passive_waiting_by_default_and_logged(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    configure_threads()  # (torch is imported in this process already, so here it only sets the variable)
    assert "OMP_WAIT_POLICY=PASSIVE" in describe_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    configure_threads()
    assert "OMP_WAIT_POLICY=ACTIVE" in describe_threads()  # the user's choice wins

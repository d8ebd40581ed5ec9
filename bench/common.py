"""What every benchmark writes beside its numbers: command, versions, hardware, date."""

from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path


def environment() -> dict:
    import torch

    env = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # NVML missing is worth recording, not fatal
            env["driver"] = f"unknown ({type(e).__name__})"
    return env


def write_result(path: Path, payload: dict) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from leapalign_fast.io import write_json_atomic

    write_json_atomic(path, {"environment": environment(), **payload})
    return path


def slug(text: str | None) -> str:
    return "".join(c if c.isalnum() else "-" for c in (text or "cpu")).strip("-").lower()

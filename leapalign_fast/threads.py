"""CPU thread settings that degrade gracefully on a shared machine; applied before torch is imported.

torch's OpenMP workers spin-wait for work by default. When the cores are oversubscribed (other jobs, other
test processes) the spinning threads take the time slices the working ones need: a 20 s run took 27 minutes on
a busy 2-core machine. Passive waiting (`OMP_WAIT_POLICY=PASSIVE`) sleeps instead; a user's own setting wins.
"""

from __future__ import annotations

import os
import sys


def configure_threads() -> bool:
    """Default OpenMP to passive waiting; False when torch was imported already (then it has no effect)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def describe_threads() -> str:
    """One log line: torch's thread counts and the environment that set them."""
    import torch

    env = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"))
    return f"threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op ({env})"

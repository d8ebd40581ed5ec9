"""bench/memory.py --quick runs on CPU and shows LeapAlign's activation memory flat in N, full's growing."""

import json
import subprocess
import sys
from pathlib import Path

from leapalign_fast.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent


def test_memory_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--quick", "--steps", "10", "50",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "memory_tiny_cpu.json").read_text())
    rows = {(r["method"], r["num_steps"]): r for r in data["rows"]}
    assert set(rows) == {(m, n) for m in METHODS for n in (10, 50)}  # every registered method
    for r in data["rows"]:
        assert not r["oom"] and r["activation_mib"] > 0 and set(r["seconds"]) == {"sampling", "grad_forwards",
                                                                                    "backward", "reward"}
    la10, la50 = rows["leapalign", 10]["activation_mib"], rows["leapalign", 50]["activation_mib"]
    assert abs(la50 - la10) <= 0.10 * la10  # flat in N
    assert rows["full", 50]["activation_mib"] > 1.5 * rows["full", 10]["activation_mib"]  # grows with N
    assert (tmp_path / "memory_tiny_cpu.md").read_text().count("\n") == 2 + 2 * len(METHODS)
    assert (tmp_path / "memory_tiny_cpu_64px.png").stat().st_size > 1000

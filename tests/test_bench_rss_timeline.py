"""bench/rss_timeline.py labels one trainer step's RSS samples by phase: sampling, grad forwards, the decoder's layers
and their recompute, the transformer's blocks in the backward."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_rss_timeline_labels_every_phase(tmp_path, monkeypatch):
    sys.path.append(str(ROOT))
    from bench import memory, rss_timeline

    monkeypatch.setattr(memory, "_MALLOC_ENV", {})  # no re-exec: the labels, not the allocator, are tested here
    assert rss_timeline.main(["--model", "tiny", "--methods", "leapalign", "--steps", "4", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "rss_timeline_tiny_cpu.json").read_text())
    assert data["environment"]["command"] and "LD_PRELOAD" in data["allocator_env"]
    (row,) = data["rows"]
    labels = set(row["phase_max_rss_mib"])
    assert row["samples"] > 0 and row["activation_mib"] > 0 and row["peak_rss_mib"] == row["peak_rss_mib"]  # not NaN
    assert {"transformer (no grad)", "transformer (grad)", "backward: start"} <= labels, labels
    assert any(x.startswith("backward: transformer block") for x in labels)
    assert any(x.startswith("backward: recompute decode up_blocks") for x in labels)  # the per-layer recompute
    assert any(x.startswith("backward: decode up_blocks") for x in labels)

"""bench/memory.py measures the trainer's step: LeapAlign's activation memory flat in N, full backprop's growing,
decode + reward checkpointing keeping only their inputs, and a timed, interleaved, RSS-measured table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from leapalign_fast.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_memory_bench_quick(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "memory.py"),
            "--quick",
            "--steps",
            "10",
            "30",
            "--checkpoint-decode",
            "both",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "memory_tiny_cpu.json").read_text())
    assert data["environment"]["command"] and data["malloc_env"]["MALLOC_MMAP_THRESHOLD_"] == "65536"
    rows = {(r["method"], r["num_steps"], r["checkpoint_decode"]): r for r in data["rows"]}
    assert set(rows) == {(m, n, c) for m in METHODS for n in (10, 30) for c in (True, False)}
    for r in data["rows"]:
        parts = r["activation_by_part_mib"]
        assert not r["oom"] and r["activation_mib"] > 0 and abs(sum(parts.values()) - r["activation_mib"]) < 1e-6
        assert set(r["seconds"]) == {"sampling", "grad_forwards", "decode_reward", "backward", "other"}
        assert r["step_seconds_min"] <= r["step_seconds"] <= r["step_seconds_max"] and r["repeats"] == 1
        assert r["peak_rss_mib"] is not None and r["parameters_saved_mib"] > 0  # parameters: reported, not counted
    for c in (True, False):
        la10, la30 = rows["leapalign", 10, c]["activation_mib"], rows["leapalign", 30, c]["activation_mib"]
        assert abs(la30 - la10) <= 0.01 * la10  # flat in N
        assert rows["full", 30, c]["activation_mib"] > 1.5 * rows["full", 10, c]["activation_mib"]  # grows with N
    # Checkpointed: decode + reward keep only their inputs, the (1, 64, 64) latents and the (1, 3, 64, 64) image.
    on, off = rows["refl", 10, True]["activation_by_part_mib"], rows["refl", 10, False]["activation_by_part_mib"]
    assert on["decode_reward"] <= (64 * 64 + 3 * 64 * 64) * 4 / 2**20 + 1e-9
    assert off["decode_reward"] > 20 * on["decode_reward"]
    assert on["transformer"] == off["transformer"]
    # LeapAlign's reward-first order: the decode + reward graph is gone before its transformer graphs exist, so the
    # largest snapshot holds one or the other (here, at 64 px, the kept decode), and with checkpointing only the
    # latents' leaf of the decode remains at the backward.
    la_on, la_off = (
        rows["leapalign", 10, True]["activation_by_part_mib"],
        rows["leapalign", 10, False]["activation_by_part_mib"],
    )
    assert la_off["transformer"] == 0 and la_off["decode_reward"] == pytest.approx(off["decode_reward"])
    assert la_on["transformer"] > 0 and la_on["decode_reward"] <= 64 * 64 * 4 / 2**20 + 1e-9
    ratio = next(
        x for x in data["ratios"] if x["method"] == "leapalign" and x["num_steps"] == 30 and x["checkpoint_decode"]
    )
    assert ratio["full_over_activation_mib"] > 5  # tiny: the transformer's 2 forwards vs 30
    assert (tmp_path / "memory_tiny_cpu.md").read_text().count("\n") == 2 + 4 * len(METHODS)
    assert (tmp_path / "memory_tiny_cpu_64px.png").stat().st_size > 1000


def test_memory_bench_random_weight_path(tmp_path, monkeypatch):
    """The full-size path (random weights built in the model dtype, the FLUX LoRA config) at toy size on CPU,
    in this process (no re-exec: the allocator settings only matter for the RSS numbers)."""
    sys.path.append(str(ROOT))
    from bench import memory

    monkeypatch.setattr(memory, "_MALLOC_ENV", {})
    assert (
        memory.main(
            [
                "--model",
                "random-tiny",
                "--methods",
                "leapalign",
                "full",
                "--steps",
                "4",
                "--repeats",
                "1",
                "--set",
                'model.compile="none"',
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "memory_random-tiny_cpu.json").read_text())
    assert data["config"]["lora"]["enabled"] and data["config"]["model"]["dtype"] == "bfloat16"
    assert data["config"]["model"]["checkpoint_decode"]  # on in the shipped FLUX configs
    assert [r["method"] for r in data["rows"]] == ["leapalign", "full"] and not any(r["oom"] for r in data["rows"])


@pytest.mark.parametrize(
    "model, family",
    [
        ("random-tiny-sd3", "sd3"),
        ("random-tiny-qwen", "qwenimage"),
        ("random-tiny-flux2", "flux2"),
        ("random-tiny-wan", "wan"),
    ],
)
def test_memory_bench_random_weight_path_of_other_backbones(model, family, tmp_path, monkeypatch):
    """The same full-size path for SD3.5-Medium, Qwen-Image and FLUX.2-Klein (their LoRA configs, random weights)
    at toy size."""
    sys.path.append(str(ROOT))
    from bench import memory

    monkeypatch.setattr(memory, "_MALLOC_ENV", {})
    assert (
        memory.main(
            [
                "--model",
                model,
                "--methods",
                "leapalign",
                "--steps",
                "4",
                "--repeats",
                "1",
                "--set",
                'model.compile="none"',
                "model.max_sequence_length=8",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / f"memory_{model}_cpu.json").read_text())
    assert data["config"]["model"]["family"] == family and data["config"]["lora"]["enabled"]
    assert [r["method"] for r in data["rows"]] == ["leapalign"] and not any(r["oom"] for r in data["rows"])


def test_method_variants_parse_and_pair_with_their_method():
    sys.path.append(str(ROOT))
    from bench import memory
    from leapalign_fast.errors import UserError

    s = memory.method_variant("leapalign:reward_first=false, alpha=0.5", 2.0, 10)
    assert (s.name, s.reward_first, s.alpha, s.lam) == ("leapalign", False, 0.5, 2.0)
    assert memory.method_variant("leapalign", 2.0, 10).reward_first
    s = memory.method_variant("leapalign:index_window=[2, 8],alpha=0.6", 1.0, 10)  # a list value keeps its commas
    assert (s.index_window, s.alpha) == ([2, 8], 0.6)
    with pytest.raises(UserError, match="method.reward_frist"):
        memory.method_variant("leapalign:reward_frist=false", 1.0, 10)
    with pytest.raises(SystemExit, match="key=value"):
        memory.method_variant("leapalign:reward_first", 1.0, 10)
    row = lambda m, peak, steps: {
        "method": m,
        "num_steps": 25,
        "resolution": 256,
        "checkpoint_decode": True,  # noqa: E731
        "oom": False,
        "activation_mib": 150.0,
        "peak_rss_mib": peak,
        "step_seconds_all": steps,
    }
    rows = [
        row("leapalign", 160.0, [1.0, 2.0, 4.0]),
        row("leapalign:reward_first=false", 200.0, [1.1, 2.0, 3.0]),
        row("full", 2000.0, [3.0, 6.0, 12.0]),
    ]
    (v,) = memory.variant_ratios(rows)
    assert v["variant"] == "leapalign:reward_first=false" and v["method"] == "leapalign"
    assert v["variant_over_method_peak_rss_mib"] == pytest.approx(1.25)
    assert v["step_seconds_ratio_paired"] == pytest.approx({"median": 1.0, "min": 0.75, "max": 1.1})


@pytest.mark.slow
def test_train_time_quick_pairs_trainer_runs(tmp_path):
    """bench/train_time.py: each variant a real `leapalign-fast train` process, rounds interleaved, paired ratios."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "train_time.py"),
            "--quick",
            "--config",
            str(ROOT / "configs" / "defaults.toml"),
            "--set",
            "batch_size=2",
            "num_steps=4",
            "--variants",
            "method.reward_first=true",
            "method.reward_first=false;lr=1e-3",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "train_time.json").read_text())
    assert len(data["rounds"]) == 2 and all(len(r) == 2 for r in data["rounds"])
    first, second = data["rows"]
    assert first["ratio_to_first_paired"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert second["variant"] == "method.reward_first=false;lr=1e-3" and second["step_seconds"] > 0
    assert all(r[v]["steps"] == 8 for r in data["rounds"] for v in r)

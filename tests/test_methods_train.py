"""Every registered method trains a few CPU steps on the tiny FLUX, logs finite losses, and resumes bit-exactly."""

import math

import pytest
from test_crash_safety import BASE, _assert_same_run, _rows

from leapalign_fast.config import load_config
from leapalign_fast.methods import METHODS
from leapalign_fast.train import train

NEW = ["flowbp_sparse", "flowbp_bridge", "flowbp_lagrange", "refl", "drtune"]  # the others: test_crash_safety


@pytest.mark.parametrize("name", NEW)
def test_method_trains_and_resumes_bit_exactly(tmp_path, name):
    assert name in METHODS
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [f"method.name={name}", "checkpoint_every=2", *BASE]
    train(load_config(None, [f"output_dir={straight}", "max_steps=4", *args]))
    train(load_config(None, [f"output_dir={split}", "max_steps=2", *args]))
    train(load_config(None, [f"output_dir={split}", "max_steps=4", "resume=true", *args]))
    _assert_same_run(straight, split, 4)
    rows = _rows(straight)
    assert all(math.isfinite(r["loss"]) for r in rows)
    if name.startswith("flowbp"):
        assert all(r["reforwards"] == 0 and r["grad_forwards"] >= 1 for r in rows)

"""`method_draws`: each rank draws its own (k, j) per micro-step (per_rank, the default) or every rank the same
(shared, FlowBP's choice); the noise stays per rank either way. `model.tf32` sets float32 matmul precision."""

import pytest
import torch

from leapalign_fast.config import load_config
from leapalign_fast.train import Trainer

BASE = ["max_steps=4", "batch_size=1", "num_steps=6", "report_to=none", "eval_prompts=['a red square']"]


def _draws(trainer, monkeypatch, rank: int, steps: int = 4) -> list[tuple[float, float, float]]:
    """(k, j, first noise value) of `steps` steps as rank `rank` of two would draw them (from step 0)."""
    acc = type(trainer.accelerator)
    monkeypatch.setattr(acc, "process_index", property(lambda self: rank))
    monkeypatch.setattr(acc, "num_processes", property(lambda self: 2))
    seen = []
    noise = trainer.noise
    monkeypatch.setattr(trainer, "noise", lambda b, g: seen.append(x := noise(b, g)) or x)
    trainer.step = 0
    out = []
    for _ in range(steps):
        record = trainer.train_step()
        out.append((record["k"], record["j"], float(seen[-1].flatten()[0])))
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("mode", ["per_rank", "shared"])
def test_method_draws_per_rank_or_shared(mode, tmp_path, monkeypatch):
    trainer = Trainer(load_config(None, [f"output_dir={tmp_path}", f"method_draws={mode}", *BASE]))
    rank0, rank1 = _draws(trainer, monkeypatch, 0), _draws(trainer, monkeypatch, 1)
    assert all(a[2] != b[2] for a, b in zip(rank0, rank1))  # the noise is each rank's own
    same = [a[:2] == b[:2] for a, b in zip(rank0, rank1)]
    assert all(same) if mode == "shared" else not all(same)


def test_tf32_switch_sets_matmul_precision(tmp_path):
    Trainer(load_config(None, [f"output_dir={tmp_path / 'a'}", "model.tf32=true", *BASE]))
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    Trainer(load_config(None, [f"output_dir={tmp_path / 'b'}", *BASE]))
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32


def test_a_bad_method_draws_is_one_line():
    from leapalign_fast.errors import UserError

    with pytest.raises(UserError, match="method_draws must be 'per_rank' or 'shared'"):
        load_config(None, ["method_draws=global"])

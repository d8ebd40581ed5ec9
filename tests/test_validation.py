"""Validation during training (leapalign_fast/validation.py): scores logged every eval_every steps, the `best`
checkpoint, early stop, resume, and the config errors. Tiny random FLUX, colour reward, a few steps."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leapalign_fast import checkpoint as ckpt
from leapalign_fast.config import load_config
from leapalign_fast.errors import UserError
from leapalign_fast.rewards import register_reward
from leapalign_fast.train import train

FAST = ["batch_size=2", "num_steps=4", "lr=1e-2"]
PROMPTS = "a red circle\ntwo blue squares\na green triangle left of a yellow circle\na red square and a blue triangle\n"


@register_reward("test_constant")
def _constant(value: float = 0.0):
    """A scorer that never improves: early stop must fire after exactly `patience` validations."""

    class Constant(torch.nn.Module):
        def forward(self, images, prompts):
            return torch.full((len(images),), float(value))

    return Constant()


@register_reward("test_falling")
def _falling():
    """A scorer that falls at every call: every validation is a new best when lower is better, none when higher is."""

    class Falling(torch.nn.Module):
        calls = 0

        def forward(self, images, prompts):
            self.calls += 1
            return torch.full((len(images),), -float(self.calls))

    return Falling()


def _cfg(tmp_path, *extra):
    (tmp_path / "val.txt").write_text(PROMPTS)
    return load_config(
        None, [f"output_dir={tmp_path / 'run'}", f"eval_prompt_file={tmp_path / 'val.txt'}", *FAST, *extra]
    )


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "validation.jsonl").read_text().splitlines()]


def test_validation_rows_tensorboard_and_best_checkpoint(tmp_path):
    res = train(
        _cfg(
            tmp_path,
            "max_steps=4",
            "eval_every=2",
            "checkpoint_every=1",
            "keep_checkpoints=10",
            "eval_rewards=['reward', 'evaluator']",
            "best_metric='reward'",
        )
    )
    out = Path(res.output_dir)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 2, 4]  # the base model first, then every eval_every steps
    for r in rows:
        assert 0.0 <= r["val/reward"] <= 1.0 and 0.0 <= r["val/evaluator"] <= 1.0 and r["eval_seconds"] > 0
        assert {"val/evaluator/colours", "val/evaluator/counting", "val/evaluator/position"} <= set(r)
        # the strict evaluator's columns: strict never above the GenEval-style pass rate, per category and overall
        columns = ("strict", "objects", "extra", "empty", "specks", "artefact", "strict/colours", "strict/position")
        assert {f"val/evaluator/{c}" for c in columns} <= set(r)
        assert all(r[f"val/evaluator/strict/{c}"] <= r[f"val/evaluator/{c}"] for c in ("colours", "counting"))
        assert 0.0 <= r["val/evaluator/strict"] <= r["val/evaluator"] and 0.0 <= r["val/evaluator/empty"] <= 1.0
    # `best` holds the weights of the step with the highest validation reward, equal to that step's checkpoint
    best_step = max(rows, key=lambda r: r["val/reward"])["step"]
    state = json.loads((out / "best" / "state.json").read_text())
    want = {"step": best_step, "metric": "reward", "value": max(r["val/reward"] for r in rows), "checksummed": True}
    assert {k: state[k] for k in want} == want and ckpt.verify_checkpoint(out / "best") is None  # a manifest
    assert [r["best"] for r in rows][0] is True and sum(r["best"] for r in rows) >= 1
    if best_step:
        regular = load_file(str(ckpt.checkpoint_root(out) / f"step_{best_step:08d}" / "trained.safetensors"))
        best = load_file(str(out / "best" / "trained.safetensors"))
        assert regular.keys() == best.keys() and all(torch.equal(regular[k], best[k]) for k in best)
    # the regular checkpoints are all still there; no staging leftovers
    assert (
        len(ckpt.list_checkpoints(out)) == 4 and not (out / ".tmp-best").exists() and not (out / ".old-best").exists()
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert {"val/reward", "val/evaluator", "reward"} <= set(tags)
    # the best checkpoint is a checkpoint directory `eval` accepts
    from leapalign_fast.evaluate import resolve_checkpoint

    assert resolve_checkpoint(res.trainer.cfg, str(out / "best")) == out / "best"


def test_early_stop_after_patience_validations_without_improvement(tmp_path):
    res = train(
        _cfg(
            tmp_path,
            "max_steps=20",
            "eval_every=2",
            "checkpoint_every=100",
            "early_stop_patience=2",
            "eval_rewards=['flat']",
            "eval_reward_options={flat = {name = 'test_constant', value = 0.5}}",
        )
    )
    rows = _rows(res.output_dir)
    # step 0 sets the best (0.5); steps 2 and 4 do not beat it: stop at step 4, with a checkpoint there
    assert res.steps == 4 and [r["step"] for r in rows] == [0, 2, 4]
    assert [r["since_best"] for r in rows] == [0, 1, 2] and all(r["val/flat"] == 0.5 for r in rows)
    assert [p.name for p in ckpt.list_checkpoints(res.output_dir)] == ["step_00000004"]
    assert json.loads((Path(res.output_dir) / "best" / "state.json").read_text())["step"] == 0


def test_resume_keeps_one_row_per_validation_and_the_best_so_far(tmp_path):
    args = ["eval_every=2", "checkpoint_every=2", "eval_rewards=['reward']"]
    train(_cfg(tmp_path, "max_steps=4", *args))
    first = _rows(tmp_path / "run")
    (tmp_path / "run" / "validation.jsonl").open("a").write(
        '{"step": 6, "val/reward": 9.0}\n{"step": 7'
    )  # a crash's leftovers
    train(_cfg(tmp_path, "max_steps=6", "resume=true", "resume_force=true", *args))
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 2, 4, 6] and rows[:3] == first
    best = max(rows, key=lambda r: r["val/reward"])
    assert json.loads((tmp_path / "run" / "best" / "state.json").read_text())["step"] == best["step"]


def test_best_mode_min_selects_and_early_stops_on_a_falling_score(tmp_path):
    """Lower is better: a falling score is a new best at every validation (max, the default, would stop at step 2
    with patience 1: test_early_stop_after_patience_validations_without_improvement)."""
    res = train(
        _cfg(
            tmp_path,
            "max_steps=4",
            "eval_every=2",
            "checkpoint_every=100",
            "early_stop_patience=1",
            "eval_rewards=['falling']",
            "eval_reward_options={falling = {name = 'test_falling'}}",
            "best_mode='min'",
        )
    )
    rows = _rows(res.output_dir)
    assert res.steps == 4 and [r["best"] for r in rows] == [True, True, True] and rows[-1]["since_best"] == 0
    state = json.loads((Path(res.output_dir) / "best" / "state.json").read_text())
    assert state["step"] == 4 and state["value"] == rows[-1]["val/falling"] < rows[0]["val/falling"]


def test_best_direction_of_evaluator_columns():
    from leapalign_fast.validation import best_direction

    def direction(*extra):
        return best_direction(load_config(None, ["eval_every=2", "eval_prompt_file=x.txt", *extra]))

    both = "eval_rewards=['reward', 'evaluator']"
    assert direction(both) == ("reward", 1.0)
    assert direction(both, "best_metric=evaluator/strict") == ("evaluator/strict", 1.0)
    assert direction(both, "best_metric=evaluator/strict/colours") == ("evaluator/strict/colours", 1.0)
    assert direction(both, "best_metric=evaluator/artefact") == ("evaluator/artefact", -1.0)
    assert direction(both, "best_metric=evaluator/artefact", "best_mode=max") == ("evaluator/artefact", 1.0)
    assert direction(both, "best_metric=evaluator/objects", "best_mode=min") == ("evaluator/objects", -1.0)
    with pytest.raises(UserError, match="has no better direction of its own"):
        direction(both, "best_metric=evaluator/objects")
    with pytest.raises(UserError, match="the evaluator has no column 'nope'"):
        direction(both, "best_metric=evaluator/nope")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval_every=-1"], "eval_every must be >= 0"),
        (["eval_every=2"], "eval_every = 2 needs eval_prompt_file"),
        (["eval_every=2", "eval_prompt_file=x.txt", "eval_rewards=[]"], "eval_rewards is empty"),
        (["eval_every=2", "eval_prompt_file=x.txt", "eval_rewards=['reward', 'reward']"], "names a scorer twice"),
        (["eval_every=2", "eval_prompt_file=x.txt", "best_metric=evaluator"], "best_metric 'evaluator' is not one of"),
        (["early_stop_patience=3"], "early_stop_patience needs validation"),
        (["early_stop_patience=-1"], "early_stop_patience must be >= 0"),
        (["best_metric=reward"], "best_metric needs validation"),
        (["eval_every=2", "eval_prompt_file=x.txt", "best_metric=evaluator/strict"], "is not one of"),
        (["eval_every=2", "eval_prompt_file=x.txt", "best_metric=reward/strict"], "only the toy evaluator has columns"),
        (["best_mode=up"], "best_mode must be 'max', 'min' or ''"),
        (["eval_num_steps=-2"], "eval_num_steps must be >= 0"),
        (
            ["eval_every=2", "eval_prompt_file=x.txt", "eval_reward_options={a = 3}"],
            "eval_reward_options.a must be a table",
        ),
    ],
)
def test_validation_config_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_validation_errors_at_start(tmp_path):
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        train(_cfg(tmp_path, "max_steps=2", "eval_every=1", "eval_rewards=['nope']"))
    (tmp_path / "dogs.txt").write_text("a red dog\n")
    with pytest.raises(UserError, match="'a red dog' is not one"):
        train(
            load_config(
                None,
                [
                    f"output_dir={tmp_path / 'run2'}",
                    f"eval_prompt_file={tmp_path / 'dogs.txt'}",
                    "max_steps=2",
                    "eval_every=1",
                    "eval_rewards=['evaluator']",
                    *FAST,
                ],
            )
        )

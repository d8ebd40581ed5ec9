"""`leapalign-fast eval`: checkpoint or base model, a prompt file, several rewards -> JSON table and grids."""

import json
from pathlib import Path

from leapalign_fast.cli import main
from leapalign_fast.config import load_config
from leapalign_fast.train import train

FAST = ["batch_size=2", "num_steps=4", "report_to=none"]
DEFAULTS = str(Path(__file__).resolve().parent.parent / "configs" / "defaults.toml")  # the library defaults


def test_eval_base_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, [f"output_dir={out}", "max_steps=3", "lr=1e-2", *FAST]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green star\n")
    for which in ("base", "latest"):
        code = main(
            [
                "eval",
                "--config",
                DEFAULTS,
                f"output_dir={out}",
                *FAST,
                "--checkpoint",
                which,
                "--prompts",
                str(prompts),
                "--rewards",
                "colour,colour:0.5",
                "--steps",
                "4",
                "--batch",
                "2",
            ]
        )
        assert code == 0
    base = json.loads((out / "eval" / "base" / "scores.json").read_text())
    tuned = json.loads((out / "eval" / "step_00000003" / "scores.json").read_text())
    for res in (base, tuned):
        assert res["scores"]["colour"]["n"] == 3 and len(res["per_prompt"]["colour"]) == 3
        assert abs(res["scores"]["colour:0.5"]["mean"] - 0.5 * res["scores"]["colour"]["mean"]) < 1e-6
    assert base["per_prompt"]["colour"] != tuned["per_prompt"]["colour"]  # the checkpoint's weights were used
    assert sorted(p.name for p in (out / "eval" / "base").glob("grid_*.png")) == ["grid_0000.png", "grid_0001.png"]
    assert "colour: " in capsys.readouterr().out


def test_eval_bad_checkpoint_is_a_user_error(tmp_path, capsys):
    code = main(["eval", "--config", DEFAULTS, f"output_dir={tmp_path}", *FAST, "--checkpoint", str(tmp_path / "nope")])
    assert code == 2 and "is not a checkpoint directory" in capsys.readouterr().err

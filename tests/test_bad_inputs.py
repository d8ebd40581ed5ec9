"""Every bad input: one clear line naming the thing and the fix, a non-zero exit, no traceback,
and an existing checkpoint left byte-for-byte intact."""

import hashlib
import json
from pathlib import Path

import pytest

from leapalign_fast.cli import main
from leapalign_fast.config import load_config
from leapalign_fast.models.flux import TinyFluxConfig, build_tiny_flux, save_flux
from leapalign_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
FAST = ["batch_size=2", "num_steps=4", "report_to=none", "max_steps=2"]
# The CLI on the library defaults (a random tiny FLUX, colour reward): these tests are about inputs, not the toy.
CLI = ["--config", str(ROOT / "configs" / "defaults.toml"), *FAST]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    """A finished run with checkpoints, which no bad input may touch."""
    out = tmp_path_factory.mktemp("existing")
    train(load_config(None, [f"output_dir={out}", "checkpoint_every=1", *FAST]))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.txt").write_text("\n  \n")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (d / "nocolour.txt").write_text("a dog\n")
    (d / "bad.toml").write_text("lr = = 1\n")
    (d / "afile").write_text("x")
    comps = build_tiny_flux(TinyFluxConfig(), seed=0)
    save_flux(comps, d / "flux")
    save_flux(comps, d / "partial")
    (d / "partial" / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (d / "partial" / "text_encoder_2" / "config.json").unlink()
    save_flux(comps, d / "wrongshape")  # weights saved for 2 heads, config says 4
    cfg = json.loads((d / "wrongshape" / "transformer" / "config.json").read_text())
    cfg["num_attention_heads"] = 4
    (d / "wrongshape" / "transformer" / "config.json").write_text(json.dumps(cfg))
    return d


# (id, argv after `train`, expected text in the one-line message)
CASES = [
    ("unknown-key", ["lrr=1e-4"], "unknown config key 'lrr'; did you mean 'lr'?"),
    ("unknown-nested-key", ["method.alhpa=0.1"], "did you mean 'method.alpha'?"),
    ("wrong-type-int", ["batch_size=1.5"], "'batch_size' must be an int"),
    ("wrong-type-bool", ["resume=1"], "'resume' must be a bool"),
    ("wrong-type-list", ["method.index_window=3"], "'method.index_window' must be a list of int"),
    ("override-syntax", ["lr"], "must look like key=value"),
    ("missing-config", ["--config", "{d}/nope.toml"], "config file {d}/nope.toml not found"),
    ("invalid-toml", ["--config", "{d}/bad.toml"], "is not valid TOML"),
    ("missing-model-dir", ["model.source={d}/nowhere"], "is not a directory"),
    (
        "partial-model-dir",
        ["model.source={d}/partial"],
        "missing: transformer/diffusion_pytorch_model.safetensors or "
        "transformer/diffusion_pytorch_model.safetensors.index.json, text_encoder_2/config.json",
    ),
    ("wrong-shape-weights", ["model.source={d}/wrongshape"], "cannot load transformer from"),
    ("unknown-reward", ["reward.name=hpsv9"], "unknown reward 'hpsv9'"),
    ("unknown-method", ["method.name=leapalgn"], "unknown method 'leapalgn'; known methods:"),
    ("empty-prompt-file", ["prompt_file={d}/empty.txt"], "has no prompts"),
    ("unreadable-prompt-file", ["prompt_file={d}/binary.txt"], "cannot be read as UTF-8 text"),
    ("missing-prompt-file", ["prompt_file={d}/none.txt"], "prompt_file {d}/none.txt not found"),
    ("prompt-without-colour", ["prompt_file={d}/nocolour.txt"], "'a dog' has none"),
    ("output-not-writable", ["output_dir={d}/afile/sub"], "is not writable"),
    ("resolution", ["resolution=72"], "resolution 72 is not divisible by 16"),
    ("window-outside", ["method.index_window=[0, 9]"], "method.index_window=[0, 9] must be"),
    ("window-too-small", ["method.index_window=[3, 4]"], "method.index_window=[3, 4] must be"),
    ("num-steps", ["num_steps=0"], "'num_steps' must be >= 1"),
    ("alpha-range", ["method.alpha=1.5"], "method.alpha must be in [0, 1]"),
    ("precision", ["mixed_precision=fp8"], "mixed_precision must be no, bf16 or fp16"),
    ("fp16-reward-first", ["mixed_precision=fp16"], "outside fp16's loss scaling"),
    ("dtype", ["model.dtype=float64"], "model.dtype must be"),
    ("lora-targets", ["lora.enabled=true", "lora.target_modules=['no_such_layer']"], "no_such_layer"),
]


def _run(argv, capsys):
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_clear_line(case, files, tmp_path, capsys):
    _, argv, expected = case
    argv = [a.format(d=files) for a in argv]
    if not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={tmp_path / 'out'}")
    code, err = _run([*CLI, *argv], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("leapalign-fast: error: "), err
    assert expected.format(d=files) in err[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_leaves_existing_checkpoints_intact(case, files, existing_run, capsys):
    _, argv, _ = case
    argv = [a.format(d=files) for a in argv]
    before = _digest(existing_run / "checkpoints")
    code, err = _run([*CLI, f"output_dir={existing_run}", "resume=true", *argv], capsys)
    assert code != 0 and len(err) == 1, err
    assert _digest(existing_run / "checkpoints") == before


def test_changed_math_key_and_fresh_run_over_checkpoints(existing_run, capsys):
    before = _digest(existing_run / "checkpoints")
    code, err = _run([*CLI, f"output_dir={existing_run}", "resume=true", "lr=5e-4", "num_steps=6"], capsys)
    assert code == 2 and "differs in num_steps (4 -> 6), lr (0.001 -> 0.0005)" in err[0]
    code, err = _run([*CLI, f"output_dir={existing_run}"], capsys)
    assert code == 2 and "already holds checkpoints" in err[0]
    assert _digest(existing_run / "checkpoints") == before

"""Fault injection, part 2: inputs a new user gets wrong. Each is one line naming the thing and the fix, exit 2,
no traceback, and an existing run's files untouched: numeric settings, `eval` options, damaged model and reward
files, memory blow-ups, Ctrl-C during start-up."""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leapalign_fast.cli import main
from leapalign_fast.config import load_config
from leapalign_fast.models.flux import TinyFluxConfig, build_tiny_flux, save_flux
from leapalign_fast.preflight import available_bytes, mixed_precision_note
from leapalign_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = str(ROOT / "configs" / "defaults.toml")
FAST = ["batch_size=2", "num_steps=4", "report_to=none", "max_steps=2"]


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def run_cli(capsys, command, *argv):
    code = main([command, "--config", DEFAULTS, *FAST, *argv])
    cap = capsys.readouterr()
    err = [line for line in re.split(r"[\r\n]", cap.err) if line.strip() and not line.startswith("train:")]
    return code, err


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    out = tmp_path_factory.mktemp("existing")
    train(load_config(None, [f"output_dir={out}", "checkpoint_every=1", *FAST]))
    return out


# ---- numeric settings: (id, override, text in the message) -----------------------------------------------------
NUMERIC = [
    ("lr-inf", "lr=inf", "'lr' must be a finite number"),
    ("lr-nan", "lr=nan", "'lr' must be a finite number"),
    ("lr-negative", "lr=-1e-4", "lr must be > 0"),
    ("lr-zero", "lr=0", "lr must be > 0"),
    ("lr-beyond-float32", "lr=1e39", "within float32 range"),
    ("max-grad-norm-nan", "max_grad_norm=nan", "'max_grad_norm' must be a finite number"),
    ("max-grad-norm-inf", "max_grad_norm=inf", "'max_grad_norm' must be a finite number"),
    ("max-grad-norm-negative", "max_grad_norm=-1", "max_grad_norm must be > 0, or 0 for no clipping"),
    ("warmup-negative", "warmup_steps=-5", "warmup_steps must be >= 0"),
    ("betas-one", "adam_betas=[1.0, 0.999]", "adam_betas must be two values in [0, 1)"),
    ("betas-negative", "adam_betas=[0.9, -0.1]", "adam_betas must be two values in [0, 1)"),
    ("betas-nan", "adam_betas=[nan, 0.999]", "'adam_betas[0]' must be a finite number"),
    ("betas-one-value", "adam_betas=[0.9]", "adam_betas must be two values"),
    ("betas-three-values", "adam_betas=[0.9, 0.99, 0.999]", "adam_betas must be two values"),
    ("eps-zero", "adam_eps=0", "adam_eps must be > 0"),
    ("eps-negative", "adam_eps=-1e-8", "adam_eps must be > 0"),
    ("eps-nan", "adam_eps=nan", "'adam_eps' must be a finite number"),
    ("eps-underflows-float32", "adam_eps=1e-50", "adam_eps must be > 0"),
    ("weight-decay-negative", "weight_decay=-0.1", "weight_decay must be >= 0"),
    ("weight-decay-inf", "weight_decay=inf", "'weight_decay' must be a finite number"),
    ("seed-negative", "seed=-1", "seed must be in [0, 2^63)"),
    ("seed-2^63", "seed=9223372036854775808", "seed must be in [0, 2^63)"),
    ("seed-2^64", "seed=18446744073709551616", "seed must be in [0, 2^63)"),
    ("ema-decay-one", "ema_decay=1.0", "ema_decay must be in [0, 1)"),
    ("ema-decay-nan", "ema_decay=nan", "'ema_decay' must be a finite number"),
    ("guidance-nan", "guidance=nan", "'guidance' must be a finite number"),
    ("guidance-negative", "guidance=-1", "guidance must be >= 0"),
    ("max-seq-len-zero", "model.max_sequence_length=0", "model.max_sequence_length must be in [1, 512]"),
    ("max-seq-len-huge", "model.max_sequence_length=100000", "model.max_sequence_length must be in [1, 512]"),
    ("eval-prompts-empty", "eval_prompts=[]", "eval_prompts must hold at least one"),
    ("eval-prompts-blank", 'eval_prompts=[" "]', "eval_prompts must hold at least one"),
    ("output-dir-empty", 'output_dir=""', "output_dir must not be empty"),
    ("batch-size-zero", "batch_size=0", "'batch_size' must be >= 1"),
    ("grad-accum-zero", "grad_accum=0", "'grad_accum' must be >= 1"),
    ("max-steps-zero", "max_steps=0", "'max_steps' must be >= 1"),
    ("checkpoint-every-zero", "checkpoint_every=0", "'checkpoint_every' must be >= 1"),
    ("keep-checkpoints-zero", "keep_checkpoints=0", "'keep_checkpoints' must be >= 1"),
    ("max-nonfinite-zero", "max_nonfinite_steps=0", "'max_nonfinite_steps' must be >= 1"),
    ("grid-every-negative", "grid_every=-1", "grid_every must be >= 0"),
    ("resolution-huge", "resolution=1048576", "resolution must be <= 8192"),
    ("lora-alpha-zero", "lora.alpha=0", "lora.alpha must be > 0"),
    ("method-alpha-nan", "method.alpha=nan", "'method.alpha' must be a finite number"),
    ("method-tau-inf", "method.tau=inf", "'method.tau' must be a finite number"),
]


@pytest.mark.parametrize("case", NUMERIC, ids=[c[0] for c in NUMERIC])
def test_numeric_setting_one_line_exit_2(case, tmp_path, capsys):
    _, override, expected = case
    argv = [override] if override.startswith("output_dir=") else [f"output_dir={tmp_path / 'out'}", override]
    code, err = run_cli(capsys, "train", *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("leapalign-fast: error: "), err
    assert expected in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("case", NUMERIC, ids=[c[0] for c in NUMERIC])
def test_numeric_setting_leaves_an_existing_run_intact(case, existing, capsys):
    before = digest(existing)
    argv = (
        [f"output_dir={existing}", "resume=true", case[1]] if "output_dir" not in case[1] else ["resume=true", case[1]]
    )
    code, err = run_cli(capsys, "train", *argv)
    assert code == 2 and len(err) == 1, err
    assert digest(existing) == before


def test_output_dir_empty_is_not_the_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "train", "output_dir=")
    assert code == 2 and len(err) == 1 and "output_dir" in err[0]
    assert list(tmp_path.iterdir()) == []


# ---- `leapalign-fast eval` -------------------------------------------------------------------------------------
EVAL = [
    ("steps-zero", ["--steps", "0"], "--steps and --batch must be >= 1"),
    ("steps-negative", ["--steps", "-3"], "--steps and --batch must be >= 1"),
    ("batch-zero", ["--batch", "0"], "--steps and --batch must be >= 1"),
    ("ema-on-base", ["--checkpoint", "base", "--ema"], "the base model has no EMA"),
    ("mistyped-run-dir", ["output_dir={tmp}/no_such_run"], "no checkpoint in"),
    ("run-dir-without-checkpoints", ["output_dir={tmp}"], "pass --checkpoint base"),
    ("not-a-checkpoint", ["--checkpoint", "{tmp}"], "is not a checkpoint directory"),
    ("unknown-reward", ["--rewards", "colour,nope"], "unknown reward 'nope'"),
]


@pytest.mark.parametrize("case", EVAL, ids=[c[0] for c in EVAL])
def test_eval_bad_option_one_line_exit_2(case, existing, tmp_path, capsys):
    _, argv, expected = case
    argv = [a.format(tmp=tmp_path) for a in argv]
    if not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={existing}")
    before = digest(existing)
    code, err = run_cli(capsys, "eval", *argv)
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert digest(existing) == before


def _flip(p: Path):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["flip-trained", "missing-ema", "garbage-manifest"])
def test_eval_on_a_damaged_latest_checkpoint_refuses(damage, existing, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(existing, out)
    d = out / "checkpoints" / "step_00000002"
    {
        "flip-trained": lambda: _flip(d / "trained.safetensors"),
        "missing-ema": lambda: (d / "ema.safetensors").unlink(),
        "garbage-manifest": lambda: (d / "manifest.json").write_text("{"),
    }[damage]()
    code, err = run_cli(capsys, "eval", f"output_dir={out}", "--steps", "2")
    assert code == 2 and len(err) == 1 and "is damaged" in err[0] and "step_00000002" in err[0], err


def test_eval_ema_without_an_ema(tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, [f"output_dir={out}", "ema_decay=0", "max_steps=1", *FAST[:3]]))
    code, err = run_cli(capsys, "eval", f"output_dir={out}", "ema_decay=0", "--ema", "--steps", "2")
    assert code == 2 and len(err) == 1 and "has no EMA" in err[0], err


# ---- damaged model and reward files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux")
    save_flux(build_tiny_flux(TinyFluxConfig(), seed=0), d / "flux")
    return d / "flux"


def _model_damage(root: Path, kind: str):
    weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    if kind == "vae-weights-as-transformer":
        shutil.copy(root / "vae" / "diffusion_pytorch_model.safetensors", weights)
    elif kind == "truncated-transformer":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage-transformer":
        weights.write_bytes(b"\x00garbage" * 10)
    elif kind == "garbage-transformer-config":
        (root / "transformer" / "config.json").write_text("{oops")
    elif kind == "empty-vae-config":
        (root / "vae" / "config.json").write_text("")
    elif kind == "transformer-as-vae":
        shutil.copy(weights, root / "vae" / "diffusion_pytorch_model.safetensors")


MODEL_DAMAGE = [
    "vae-weights-as-transformer",
    "truncated-transformer",
    "garbage-transformer",
    "garbage-transformer-config",
    "empty-vae-config",
    "transformer-as-vae",
]


@pytest.mark.parametrize("kind", MODEL_DAMAGE)
def test_damaged_model_directory_one_line(kind, flux_dir, tmp_path, capsys):
    root = tmp_path / "flux"
    shutil.copytree(flux_dir, root)
    _model_damage(root, kind)
    code, err = run_cli(capsys, "train", f"model.source={root}", f"output_dir={tmp_path / 'out'}")
    assert code == 2 and len(err) == 1 and "cannot load" in err[0], err


def _damaged_weights(path: Path, kind: str):
    if kind == "truncated":
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "garbage":
        path.write_bytes(os.urandom(256))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled-code":
        import collections

        torch.save(collections.Counter("x"), path)  # not a plain tensor dict: weights_only refuses it
    elif kind == "not-a-dict":
        torch.save(torch.zeros(3), path)
    elif kind == "wrong-model":
        torch.save(
            {
                "blip.visual_encoder.cls_token": torch.zeros(1, 1, 8),
                "blip.text_encoder.x": torch.zeros(1),
                "mlp.layers.0.weight": torch.zeros(1),
            },
            path,
        )


REWARD_FILES = ["truncated", "garbage", "empty", "pickled-code", "not-a-dict", "wrong-model"]


@pytest.mark.parametrize("kind", REWARD_FILES)
def test_damaged_imagereward_file_one_line(kind, tmp_path):
    from leapalign_fast.errors import UserError
    from leapalign_fast.rewards import build_reward

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    _damaged_weights(tmp_path / "ImageReward.pt", kind)
    with pytest.raises(UserError) as e:
        build_reward("imagereward", checkpoint=str(tmp_path / "ImageReward.pt"), tokenizer=str(tmp_path / "bert"))
    msg = str(e.value)
    assert "\n" not in msg and ("ImageReward" in msg or "imagereward" in msg), msg


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP in HF format (the architecture directory HPS and the aesthetic reward need)."""
    from transformers import CLIPConfig, CLIPModel

    from leapalign_fast.models.text import build_tiny_clip_tokenizer

    tok = build_tiny_clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    d = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", REWARD_FILES)
@pytest.mark.parametrize("reward", ["hpsv2.1", "aesthetic"])
def test_damaged_hps_and_aesthetic_files_one_line(reward, kind, tiny_clip, tmp_path):
    from leapalign_fast.errors import UserError
    from leapalign_fast.rewards import build_reward

    f = tmp_path / "weights.pt"
    _damaged_weights(f, kind)
    opts = {"clip": str(tiny_clip), ("checkpoint" if reward == "hpsv2.1" else "mlp"): str(f)}
    with pytest.raises(UserError) as e:
        build_reward(reward, **opts)
    msg = str(e.value)
    assert "\n" not in msg and ("hps" if reward == "hpsv2.1" else "aesthetic") in msg.lower(), msg


# ---- memory blow-ups are refused before the first step --------------------------------------------------------
BLOWUPS = [
    ("batch-2M", ["batch_size=2000000"]),
    ("4096px-batch-64", ["resolution=4096", "batch_size=64"]),
    ("renoise-100000", ["method.name=draft_lv", "method.renoise=100000"]),
]


@pytest.mark.parametrize("case", BLOWUPS, ids=[c[0] for c in BLOWUPS])
def test_memory_blowup_is_refused_with_an_estimate(case, tmp_path, capsys):
    start = time.perf_counter()
    code, err = run_cli(capsys, "train", f"output_dir={tmp_path}", *case[1])
    assert code == 2 and len(err) == 1 and "one training step needs at least" in err[0] and "GiB" in err[0], err
    assert time.perf_counter() - start < 30


def test_memory_estimate_lets_the_usual_runs_through():
    assert available_bytes(torch.device("cpu")) > 0


# ---- one source of truth for mixed precision ------------------------------------------------------------------


def test_accelerate_yaml_mixed_precision_loses_with_a_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    note = mixed_precision_note(load_config(None, ["mixed_precision=no"]))
    assert "mixed_precision=bf16" in note and "'no' is used" in note
    assert mixed_precision_note(load_config(None, ["mixed_precision=bf16"])) is None


# ---- Ctrl-C during start-up -------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [1.0, 2.5])
def test_ctrl_c_during_start_up_is_one_line(delay, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "leapalign_fast.cli",
            "train",
            "--config",
            DEFAULTS,
            *FAST,
            f"output_dir={tmp_path}",
            "max_steps=100000",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not line.startswith("train:")]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    # Before the loop: 130 (nothing written). Inside it: the pre-emption path (exit 75, a checkpoint written).
    assert proc.returncode in (130, 75), (proc.returncode, lines)

"""Config: TOML + overrides onto dataclasses, and one clear error for every bad key or value."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from leapalign_fast.config import Config, config_toml, load_config
from leapalign_fast.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def resolved(*args):
    """A config with its `[method]` table built into the method's settings (what train and the CLI run)."""
    return load_config(*args)


def test_defaults_toml_equals_the_library_defaults():
    assert resolved(ROOT / "configs" / "defaults.toml") == Config()


def test_tiny_toml_is_the_shipped_toy_setup_from_any_directory(tmp_path, monkeypatch):
    """The embedded default trains the shipped toy model on the toy reward; its relative paths are relative to the
    file, so it loads the same from any working directory."""
    cfg = load_config(ROOT / "configs" / "tiny.toml")
    assert cfg.model.source == str(ROOT / "assets" / "toy" / "flux") and cfg.reward.name == "toy"
    assert all(Path(p).is_file() for p in cfg.reward.options["path"]) and Path(cfg.prompt_file).is_file()
    assert (Path(cfg.model.source) / "model_index.json").is_file()
    monkeypatch.chdir(tmp_path)
    assert load_config(ROOT / "configs" / "tiny.toml") == cfg
    # every other key keeps the library default unless the file sets it
    assert cfg.method.name == Config().method.name and cfg.guidance == Config().guidance


def test_relative_paths_in_a_file_resolve_against_it_and_overrides_against_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.toml"
    path.write_text(
        'prompt_file = "p.txt"\n[model]\nsource = "../m"\n[reward]\nname = "toy"\n'
        'options = { path = "r.safetensors" }\n'
    )
    cfg = load_config(path)
    assert (cfg.prompt_file, cfg.model.source) == (str(tmp_path / "sub" / "p.txt"), str(tmp_path / "m"))
    assert cfg.reward.options["path"] == str(tmp_path / "sub" / "r.safetensors")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["prompt_file=q.txt", "model.source=tiny"])
    assert (cfg.prompt_file, cfg.model.source) == ("q.txt", "tiny")
    assert load_config(None, ["model.source=/abs/m"]).model.source == "/abs/m"
    path.write_text('[reward]\nname = "toy"\noptions = { path = ["a.safetensors", "/abs/b.safetensors"] }\n')
    assert load_config(path).reward.options["path"] == [str(tmp_path / "sub" / "a.safetensors"), "/abs/b.safetensors"]


def test_overrides_dotted_and_typed():
    cfg = resolved(
        None,
        [
            "lr=1e-4",
            "method.alpha=0.5",
            "method.index_window=[1, 5]",
            "resume=true",
            "output_dir=/tmp/x",
            "model.tiny.layers=2",
            "lora.target_modules=['attn.to_q']",
        ],
    )
    assert cfg.lr == 1e-4 and cfg.method.alpha == 0.5 and cfg.method.index_window == [1, 5]
    assert cfg.resume is True and cfg.output_dir == "/tmp/x" and cfg.model.tiny.layers == 2
    assert cfg.lora.target_modules == ["attn.to_q"]


def test_int_accepted_for_float_and_roundtrip(tmp_path):
    cfg = load_config(None, ["lr=1", "guidance=4"])
    assert isinstance(cfg.lr, float) and cfg.guidance == 4.0
    path = tmp_path / "c.toml"
    path.write_text(config_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lrr=1e-4"], "unknown config key 'lrr'; did you mean 'lr'"),
        (["method.alhpa=0.1"], "unknown config key 'method.alhpa'; did you mean 'method.alpha'"),
        (["model.tiny.layerz=3"], "did you mean 'model.tiny.layers'"),
        (["batch_size=1.5"], "'batch_size' must be an int"),
        (["resume=1"], "'resume' must be a bool"),
        (["lr='fast'"], "'lr' must be a float"),
        (["method.index_window=['a']"], "'method.index_window' must be a list of int"),
        (["method=3"], "'method' is a table"),
        (["num_steps=0"], "'num_steps' must be >= 1"),
        (["method.alpha=1.5"], "method.alpha must be in"),
        (["mixed_precision=fp8"], "mixed_precision must be"),
        (["noequals"], "must look like key=value"),
    ],
)
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolved(None, overrides)


def test_missing_and_invalid_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "leapalign_fast.cli", "train", "max_stepz=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "leapalign-fast: error: unknown config key 'max_stepz'; did you mean 'max_steps'?"
    ]


@pytest.mark.parametrize("name", ["flux_leapalign.toml", "flux_leapalign_full.toml"])
def test_flux_configs_hold_the_paper_settings(name):
    cfg = resolved(ROOT / "configs" / name)
    assert (cfg.num_steps, cfg.guidance, cfg.lr, cfg.weight_decay, cfg.ema_decay, cfg.max_grad_norm) == (
        25,
        3.5,
        1e-5,
        1e-4,
        0.995,
        1.0,
    )
    assert (cfg.method.alpha, cfg.method.tau, cfg.method.lam, cfg.reward.name) == (0.3, 0.1, 0.55, "hpsv2.1")
    assert cfg.mixed_precision == "bf16" and cfg.model.dtype == "bfloat16" and cfg.resolution % 16 == 0
    assert cfg.lora.enabled == (name == "flux_leapalign.toml")
    from leapalign_fast.rewards import build_reward

    assert cfg.model.source == "black-forest-labs/FLUX.1-dev" and cfg.prompts == "hpdv2-train"  # hub ids, by name
    # the options fit the builder; the weights are the published ones, not in this machine's (offline) cache
    with pytest.raises(UserError, match="hpsv2.1.*laion/CLIP-ViT-H-14-laion2B-s32B-b79K.*HF_HUB_OFFLINE=1"):
        build_reward(cfg.reward.name, **cfg.reward.options)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_and_validates(path):
    cfg = resolved(path)
    assert load_config(path).method.name == cfg.method.name
    assert resolved(path) == cfg and config_toml(cfg)


def test_installed_package_does_not_take_a_configs_folder_beside_its_site(tmp_path):
    """Installed with `pip install --target /tmp/site` (the GPU script's wheels), the package's parent is the site
    folder: the CLI's default config was /tmp/site/configs/tiny.toml, whatever that is (or, silently, the library
    defaults). It takes a checkout's configs only, and says when it falls back to the defaults."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(ROOT / "leapalign_fast", site / "leapalign_fast", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "configs").mkdir()
    (site / "configs" / "tiny.toml").write_text("seed = 12345\n")  # another distribution's data, not ours
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    code = "import leapalign_fast.cli as c; print(c.__file__); print(c._default_config())"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    where, default = proc.stdout.split()
    assert where.startswith(str(site)) and default == "None", proc.stdout
    assert "library defaults" in proc.stderr and "--config" in proc.stderr
    # From a checkout, the checkout's configs/tiny.toml is the default from any working directory.
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert proc.stdout.split()[1] == str(ROOT / "configs" / "tiny.toml"), proc.stdout + proc.stderr

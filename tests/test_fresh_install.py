"""What a fresh install starts from the repository root works with the versions installed now.

- No file or folder that the project puts on `sys.path` (the repository root under `python -m`, `accelerate launch -m`
  and `torchrun -m`; `bench/` under `python bench/<script>.py`; `tests/` under pytest) shadows an installed top-level
  module. The project's `kernels/` folder once did: transformers imports Hugging Face's `kernels` distribution.
- `import kernels` resolves to the installed distribution from each of those places.
- `torchrun` and `accelerate launch` train with 2 CPU processes from the repository root.
- Every benchmark script answers `--help` from the repository root.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import pkgutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from test_fsdp import _free_port

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PATHS = [ROOT, ROOT / "bench", ROOT / "tests"]  # what `python -m`, `python bench/x.py` and pytest prepend
OWN_DISTRIBUTIONS = {"leapalign-fast", "leapalign_fast"}


def _top_level_names_of_distributions() -> dict[str, str]:
    """Top-level import names of every installed distribution but this project, from its RECORD (this also
    catches namespace packages and names not importable yet)."""
    names: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["Name"] or "?"
        if dist_name.lower().replace("_", "-") in OWN_DISTRIBUTIONS:
            continue
        label = f"{dist_name} {dist.version}"
        for line in (dist.read_text("RECORD") or "").splitlines():
            path = line.split(",", 1)[0]
            first, sep, _ = path.partition("/")
            if not sep:  # a file at the top: a module, or metadata/.pth to skip
                if not first.endswith((".py", ".so", ".pyd")) or first.startswith("__editable__"):
                    continue
                first = first.split(".")[0]
            elif first.endswith((".dist-info", ".egg-info", ".data")) or first in {"..", "__pycache__"}:
                continue
            if first.isidentifier():
                names.setdefault(first, label)
    return names


@functools.lru_cache(maxsize=1)
def installed_top_level_modules() -> dict[str, str]:
    """Every top-level module importable without the project's own paths: name -> where it comes from."""
    own = {p.resolve() for p in PROJECT_PATHS}
    names = {n: "standard library" for n in (*sys.stdlib_module_names, *sys.builtin_module_names)}
    for entry in sys.path:
        if not entry or not Path(entry).is_dir() or Path(entry).resolve() in own:
            continue
        for m in pkgutil.iter_modules([entry]):
            names.setdefault(m.name, entry)
    for name, where in _top_level_names_of_distributions().items():
        names.setdefault(name, where)
    return names


def provided_top_level_modules(directory: Path) -> dict[str, Path]:
    """What `directory` on sys.path would provide first: modules and regular packages (a folder without
    `__init__.py` is a namespace portion, which never wins over an installed module or package)."""
    found = {}
    for m in pkgutil.iter_modules([str(directory)]):
        found[m.name] = directory / (m.name if m.ispkg else m.name + ".py")
    return found


def shadowed(directory: Path, installed: dict[str, str]) -> list[str]:
    """One line per module `directory` would shadow: its file, the name, and what it hides."""
    lines = []
    for name, path in sorted(provided_top_level_modules(directory).items()):
        if name in installed:
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            lines.append(f"{shown} shadows `{name}` ({installed[name]})")
    return lines


@pytest.mark.parametrize("where", ["", "bench", "tests"])
def test_no_project_path_shadows_an_installed_module(where):
    installed = installed_top_level_modules()
    assert "kernels" in installed, "transformers needs Hugging Face's `kernels`; it should be installed"
    assert shadowed(ROOT / where, installed) == []


def test_shadow_check_fails_on_a_shadowing_file(tmp_path):
    """The check above can fail: a module and a regular package named like installed ones are reported; a
    namespace folder (no `__init__.py`, like `kernels/`) and a fresh name are not."""
    (tmp_path / "json.py").write_text("")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "connector.py").write_text("")
    (tmp_path / "leapalign_not_a_module_anywhere.py").write_text("")
    report = shadowed(tmp_path, installed_top_level_modules())
    assert [line.split("`")[1] for line in report] == ["json", "torch"], report
    (tmp_path / "kernels" / "__init__.py").write_text("")  # the old layout: a regular package named `kernels`
    report = shadowed(tmp_path, installed_top_level_modules())
    assert [line.split("`")[1] for line in report] == ["json", "kernels", "torch"], report


def _site_dirs() -> list[Path]:
    return [Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")]


@pytest.mark.parametrize("cwd", ["", "bench", "tests"])
def test_import_kernels_finds_the_installed_distribution(cwd):
    """From the root (`python -m ...`), from bench/ (`python bench/x.py` puts it first) and from tests/: `kernels`
    is Hugging Face's, and transformers' import of it (the crash a fresh install met) succeeds."""
    code = "import kernels, transformers.activations; print(kernels.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_installed_kernels(Path(proc.stdout.strip().splitlines()[-1]))


def _assert_installed_kernels(found: Path) -> None:
    """Hugging Face's package in site-packages (a venv may live inside the checkout, as CI's .venv does), not a
    file of the project's."""
    found = found.resolve()
    assert any(found.is_relative_to(d) for d in _site_dirs()), (found, _site_dirs())
    assert not any(found.is_relative_to(p) for p in (ROOT / "kernels", ROOT / "bench", ROOT / "tests")), found


def test_import_kernels_in_the_test_process():
    import kernels

    _assert_installed_kernels(Path(kernels.__file__))


LAUNCHERS = {  # the launcher's executable (beside this Python) -> its arguments for 2 processes on a free port
    "torchrun": lambda port: ["--nproc_per_node", "2", "--master_port", str(port)],
    "accelerate": lambda port: [
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_launch_from_the_repository_root(launcher, tmp_path):
    """The README's multi-process commands, with 2 CPU processes (gloo), `-m leapalign_fast.cli` from the root."""
    exe = Path(sys.executable).parent / launcher
    cmd = [
        str(exe),
        *LAUNCHERS[launcher](_free_port()),
        "-m",
        "leapalign_fast.cli",
        "train",
        "max_steps=2",
        "checkpoint_every=2",
        f"output_dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done: 2 steps") == 1, proc.stdout[-3000:]  # one closing line, from rank 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.glob("rng_rank*.safetensors")) == [
        "rng_rank0.safetensors",
        "rng_rank1.safetensors",
    ]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def _bench_scripts() -> list[str]:
    return sorted(p.name for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def test_bench_scripts_are_found():
    assert {"memory.py", "kernel_speed.py", "train_time.py", "quality.py", "sampler.py"} <= set(_bench_scripts())


@pytest.mark.parametrize("script", _bench_scripts())
def test_bench_script_help_from_the_repository_root(script):
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "no help text"

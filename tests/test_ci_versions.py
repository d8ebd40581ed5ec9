"""The record of versions CI installs (.ci/locked-cpu.txt) and the tool that checks an environment against it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / ".ci" / "locked-cpu.txt"


def _versions_module():
    spec = importlib.util.spec_from_file_location("ci_versions", ROOT / ".ci" / "versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


versions = _versions_module()


def _direct_requirements() -> list[Requirement]:
    """The project's dependencies, its test extra and its build backend (CI builds with the recorded one)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    listed = project["dependencies"] + project["optional-dependencies"]["test"] + pyproject["build-system"]["requires"]
    reqs = [Requirement(r) for r in listed]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def test_the_lock_holds_every_direct_dependency_inside_its_bounds():
    locked = versions.parse(LOCK.read_text())
    reqs = _direct_requirements()
    assert len(reqs) >= 15 and "setuptools" in {r.name for r in reqs}
    for req in reqs:
        key = versions.normalize(req.name)
        assert key in locked, f"{req.name} is a dependency but not in {LOCK.name}: run bash .ci/lock"
        assert req.specifier.contains(Version(locked[key][1]), prereleases=True), (req, locked[key])
    assert locked["torch"][1].endswith("+cpu"), "CI's record is the CPU build of torch"


def test_each_lower_bound_is_at_most_the_locked_version():
    """A lower bound above the recorded version would make CI install what pyproject.toml refuses."""
    locked = versions.parse(LOCK.read_text())
    for req in _direct_requirements():
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
        for low in lows:
            assert low <= Version(locked[versions.normalize(req.name)][1]), (req, locked[versions.normalize(req.name)])


def test_parse_and_differences_name_each_package():
    locked = versions.parse("# header\nTorch==2.13.0+cpu\ntyping_extensions==4.16.0\nkept==1.0\n\ngone==0.1\n")
    installed = versions.parse("torch==2.14.1\ntyping-extensions==4.16.0\nkept==1.0\nkernels==0.19.1\n")
    assert versions.differences(locked, locked) == []
    assert versions.differences(locked, installed) == [
        "gone: locked 0.1, not installed",
        "kernels: not in the lock, installed 0.19.1",
        "torch: locked 2.13.0+cpu, installed 2.14.1",
    ]
    assert versions.moved(locked, installed) == ["kernels", "torch"]  # what blame tries
    assert versions.moved(installed, locked) == ["gone", "torch"]  # what restore reinstalls


@pytest.mark.parametrize("line", ["torch>=2.13", "torch==", "==1.0", "-e ."])
def test_parse_refuses_a_line_that_is_not_a_pin(line):
    with pytest.raises(ValueError, match="not a `name==version` line"):
        versions.parse(line)


def test_failed_tests_reads_a_junit_report(tmp_path, monkeypatch):
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_fresh_install" name="test_a[bench]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_fresh_install" name="test_ok"/>'
        '<testcase classname="tests.test_flow.TestLeap" name="test_b"><error message="y"/></testcase>'
        '<testcase classname="tests.test_flow" name="test_skipped"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    monkeypatch.chdir(ROOT)
    assert versions.failed_tests(report) == [
        "tests/test_flow.py::TestLeap::test_b",
        "tests/test_fresh_install.py::test_a[bench]",
    ]


def test_check_against_this_environment(tmp_path):
    """`check` passes on this environment's own freeze and names each difference when one version is changed, one
    package dropped and one added."""
    frozen = versions.freeze()
    exact = tmp_path / "exact.txt"
    exact.write_text(frozen + "\n")
    run = [sys.executable, str(ROOT / ".ci" / "versions.py"), "check"]
    proc = subprocess.run([*run, str(exact)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pins = versions.parse(frozen)
    changed, dropped = "numpy", "tqdm"
    lines = [f"{n}=={'0.0.1' if k == changed else v}" for k, (n, v) in pins.items() if k != dropped]
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("\n".join(lines + ["not-a-real-package-xyz==1.0"]) + "\n")
    proc = subprocess.run([*run, str(wrong)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert f"locked 0.0.1, installed {pins[changed][1]}" in proc.stdout
    assert f"{pins[dropped][0]}: not in the lock, installed {pins[dropped][1]}" in proc.stdout
    assert "not-a-real-package-xyz: locked 1.0, not installed" in proc.stdout
    assert "bash .ci/lock" in proc.stderr


def test_blame_tries_only_the_drifted_packages_nothing_else_drifted_pulls_in():
    graph = {
        "torch": ["cuda-toolkit", "triton", "sympy"],
        "cuda-toolkit": ["nvidia-cublas"],
        "nvidia-cublas": [],
        "transformers": ["kernels", "numpy"],
        "kernels": ["huggingface-hub"],
        "triton": [],
    }
    drifted = ["cuda-toolkit", "kernels", "nvidia-cublas", "torch", "transformers", "triton", "tqdm"]
    assert versions.roots(drifted, graph) == ["torch", "transformers", "tqdm"]
    assert versions.roots(["kernels"], graph) == ["kernels"]  # alone, it is tried itself


def test_requires_reads_this_environment():
    graph = versions.requires()
    assert "huggingface-hub" in graph["transformers"] and "sympy" in graph["torch"]
    assert "pytest" not in graph["transformers"]  # only its `testing` extra needs pytest: extras are left out


def test_graph_follows_the_extras_a_requirement_names():
    """torch's CUDA build needs `cuda-toolkit[cublas,...]`, whose extras name the nvidia-* libraries: they count
    as torch's, so blame tries torch with them rather than each library alone. Other extras are left out."""
    g = versions.graph(
        {
            "torch": [
                "cuda-toolkit[cublas, cudart]==13.0.3; platform_system == 'Linux'",
                "sympy>=1.13",
                'optree>=0.13; extra == "optree"',
            ],
            "cuda-toolkit": [
                'nvidia-cublas==13.1; extra == "cublas"',
                'nvidia-cuda-runtime; extra == "cudart"',
                'nvidia-cufft; extra == "cufft"',
            ],
            "Transformers": ["huggingface-hub<3.0,>=2.4.0", "kernels<0.20,>=0.19.1", 'pytest; extra == "testing"'],
        }
    )
    assert g["torch"] == ["cuda-toolkit", "nvidia-cublas", "nvidia-cuda-runtime", "sympy"]
    assert g["cuda-toolkit"] == [] and g["transformers"] == ["huggingface-hub", "kernels"]

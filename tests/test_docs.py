"""The documentation stands alone: no project file cites a document outside the repository, every results file and
relative link the README and docs/ cite exists, and the README holds the test command CI runs."""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()
OUTSIDE = (b"DESIGN.md", b"../shared")  # documents users of the repository cannot see
TEST_COMMAND = "pytest -q -n 2 --dist worksteal"  # .ci/run runs it


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (git ls-files failed)")
    return [p for p in out.decode().split("\0") if p]


def _expand(pattern: str) -> list[str]:
    """Shell-style braces: `a.{json,md}` -> a.json, a.md; `x{,_rest}.md` -> x.md, x_rest.md."""
    parts = re.split(r"(\{[^{}]*\})", pattern)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(c) for c in itertools.product(*choices)]


def _strip_code_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def cited_results(text: str) -> list[str]:
    """Every `bench/results/...` path in a text, braces expanded (a `*` is left for a glob)."""
    found = []
    for m in re.finditer(r"bench/results/(?:[\w.\-*]|\{[^}\s]*\})+", text):
        found += _expand(m.group(0).rstrip("."))
    return found


def relative_links(text: str) -> list[tuple[str, str]]:
    """(path, fragment) of every markdown link `[text](target)` that is not a URL; path "" for an in-page anchor."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _strip_code_fences(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue
        path, _, fragment = target.partition("#")
        out.append((path, fragment))
    return out


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a markdown file's headings: lower case, punctuation dropped, spaces to hyphens,
    `-1`, `-2`, ... on repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", _strip_code_fences(text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_no_tracked_file_cites_a_document_outside_the_repository():
    hits = []
    for rel in _tracked_files():
        path = ROOT / rel
        if rel == THIS or path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        hits += [f"{rel}: {needle.decode()}" for needle in OUTSIDE if needle in data]
    assert hits == [], "cite docs/ instead: " + "; ".join(hits)


def test_markdown_files_exist():
    assert (ROOT / "README.md").is_file() and len(_markdown_files()) > 1, "README.md and docs/*.md"


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_cited_results_file_exists(md):
    missing = [c for c in cited_results(md.read_text()) if not (any(ROOT.glob(c)) if "*" in c else (ROOT / c).exists())]
    assert missing == []


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_an_existing_file(md):
    """And a `#fragment` into a markdown file names one of its headings."""
    broken = []
    for path, fragment in relative_links(md.read_text()):
        target = md.parent / path if path else md
        if not target.exists():
            broken.append(path)
        elif fragment and target.suffix == ".md" and fragment not in anchors(target.read_text()):
            broken.append(f"{path}#{fragment}")
    assert broken == []


def test_readme_holds_the_test_command_ci_runs():
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    readme = [line.split("#")[0].strip() for block in fenced for line in block.splitlines()]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in (TEST_COMMAND, f"{TEST_COMMAND} -m slow"):  # the default run, then the tests marked slow
        assert command in readme and command in ci, command


def test_the_checks_can_fail():
    """The helpers find what they look for (a missing result file, a broken link, braces expanded)."""
    assert cited_results("see `bench/results/memory_mid_cpu.{json,md}`.") == [
        "bench/results/memory_mid_cpu.json",
        "bench/results/memory_mid_cpu.md",
    ]
    assert cited_results("bench/results/q{,_rest}_runs.jsonl") == [
        "bench/results/q_runs.jsonl",
        "bench/results/q_rest_runs.jsonl",
    ]
    assert not (ROOT / cited_results("(bench/results/no_such_file.json)")[0]).exists()
    assert relative_links("[a](docs/x.md#y) [b](https://e.org) [c](#z) [d](../up.md)") == [
        ("docs/x.md", "y"),
        ("", "z"),
        ("../up.md", ""),
    ]
    assert anchors("# Title\n## FSDP2 full fine-tunes (`fsdp = true`)\n## Notes\n## Notes\n") == {
        "title",
        "fsdp2-full-fine-tunes-fsdp--true",
        "notes",
        "notes-1",
    }

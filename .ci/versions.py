"""The recorded versions (.ci/locked-cpu.txt) against what a virtual environment holds.

    python .ci/versions.py write LOCK        record this environment's versions (after the suite passed in it)
    python .ci/versions.py freeze OUT        write this environment's versions as LOCK would hold them
    python .ci/versions.py check LOCK        exit 1, naming each package, unless this environment equals LOCK
    python .ci/versions.py drift LOCK        list what this environment (the newest versions) has that LOCK has not
    python .ci/versions.py requires OUT      write this environment's dependency graph (JSON: name -> needs)
    python .ci/versions.py blame LOCK NEWEST_FREEZE JUNIT_XML REQUIRES_JSON
                                             in this (locked) environment, upgrade one drifted package at a time
                                             (with what it needs) to its newest version and rerun the tests that
                                             failed with the newest set: names the releases that break them alone.
                                             Packages only pulled in by another drifted one (torch's nvidia-*
                                             libraries, transformers' kernels) are tried through that one.

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def normalize(name: str) -> str:
    """PEP 503 name: `Jinja2`, `typing_extensions` -> `jinja2`, `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(text: str) -> dict[str, tuple[str, str]]:
    """`name==version` lines (comments and blanks skipped) -> {normalized name: (name, version)}."""
    pins = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"not a `name==version` line: {raw!r}")
        pins[normalize(name.strip())] = (name.strip(), version.strip())
    return pins


def differences(locked: dict[str, tuple[str, str]], installed: dict[str, tuple[str, str]]) -> list[str]:
    """One line per package whose version differs, that only one side has; empty when equal."""
    lines = []
    for key in sorted(locked.keys() | installed.keys()):
        if key not in installed:
            lines.append(f"{locked[key][0]}: locked {locked[key][1]}, not installed")
        elif key not in locked:
            lines.append(f"{installed[key][0]}: not in the lock, installed {installed[key][1]}")
        elif locked[key][1] != installed[key][1]:
            lines.append(f"{installed[key][0]}: locked {locked[key][1]}, installed {installed[key][1]}")
    return lines


def freeze() -> str:
    """This environment's distributions, setuptools (the build backend: CI builds the editable install with the
    recorded one) included, without pip and without the project itself (an editable install)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = [line for line in out.splitlines() if "==" in line and not line.startswith("-e ")]
    return "\n".join(line for line in lines if normalize(line.partition("==")[0]) != "pip")


def write(lock: Path) -> None:
    pins = parse(freeze())
    header = [
        "# The exact versions the test suite last passed with: CI (.ci/run) installs these (pip -c), then runs the",
        "# README's test command; it also runs the suite on the newest versions pyproject.toml allows and reports",
        "# what differs from this file. Refresh: bash .ci/lock (a fresh venv with the newest versions, torch 2.13.0",
        "# CPU build as CI; the new file is kept only if the suite passes with it).",
        f"# Written {datetime.date.today().isoformat()} with Python {platform.python_version()} on "
        f"{platform.system()} {platform.machine()}.",
    ]
    body = [f"{name}=={version}" for _, (name, version) in sorted(pins.items())]
    tmp = lock.with_suffix(lock.suffix + ".tmp")
    tmp.write_text("\n".join(header + body) + "\n")
    tmp.replace(lock)
    print(f"versions: wrote {len(body)} versions to {lock}")


def moved(base: dict[str, tuple[str, str]], other: dict[str, tuple[str, str]]) -> list[str]:
    """The packages of `other` (normalized names, sorted) that `base` lacks or holds at another version."""
    return [k for k in sorted(other) if base.get(k, ("", ""))[1] != other[k][1]]


def failed_tests(junit_xml: Path) -> list[str]:
    """pytest node ids of the failures and errors in a --junitxml report."""
    ids = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        parts = case.get("classname", "").split(".")  # tests.test_x[.TestClass]: the module path, then classes
        cut = next((i for i in range(len(parts), 0, -1) if Path(*parts[:i]).with_suffix(".py").is_file()), len(parts))
        ids.append("::".join([str(Path(*parts[:cut]).with_suffix(".py")), *parts[cut:], case.get("name", "")]))
    return sorted(set(ids))


REQ = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
EXTRA = re.compile(r"\bextra\s*==\s*['\"]([^'\"]+)['\"]")


def requires() -> dict[str, list[str]]:
    """This environment's dependency graph (see `graph`)."""
    return graph({dist.metadata["Name"]: dist.requires or [] for dist in importlib.metadata.distributions()})


def graph(requirements: dict[str, list[str]]) -> dict[str, list[str]]:
    """{distribution: its Requires-Dist lines} -> {normalized name: the names it needs}: the unconditional
    requirements, plus, for a requirement with extras (`cuda-toolkit[cublas]`), what those extras of it require."""
    plain: dict[str, list[tuple[str, list[str]]]] = {}
    by_extra: dict[tuple[str, str], list[tuple[str, list[str]]]] = {}
    for dist_name, reqs in requirements.items():
        key = normalize(dist_name)
        plain.setdefault(key, [])
        for req in reqs:
            m = REQ.match(req)
            if not m:
                continue
            need = (normalize(m.group(1)), [normalize(e.strip()) for e in (m.group(2) or "").split(",") if e.strip()])
            extra = EXTRA.search(req)
            if extra:
                by_extra.setdefault((key, normalize(extra.group(1))), []).append(need)
            else:
                plain[key].append(need)
    out = {}
    for key, needs in plain.items():
        names, seen, todo = set(), set(), list(needs)
        while todo:
            name, extras = todo.pop()
            names.add(name)
            for e in extras:
                if (name, e) not in seen:
                    seen.add((name, e))
                    todo += by_extra.get((name, e), [])
        out[key] = sorted(names - {key})
    return out


def roots(drifted: list[str], graph: dict[str, list[str]]) -> list[str]:
    """The drifted packages that no other drifted package needs (the others come with them)."""
    pulled = {need for name in drifted for need in graph.get(name, []) if need != name}
    return [name for name in drifted if name not in pulled]


def restore(locked: dict[str, tuple[str, str]]) -> None:
    """Put this environment back to the recorded set: remove what the lock lacks, reinstall what differs."""
    now = parse(freeze())
    extra = [now[k][0] for k in sorted(now) if k not in locked]
    if extra:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
    changed = [f"{locked[k][0]}=={locked[k][1]}" for k in moved(now, locked)]
    if changed:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *changed], check=True)
    left = differences(locked, parse(freeze()))
    if left:
        raise RuntimeError(f"blame: could not put the recorded set back: {left}")


def blame(lock: Path, newest_freeze: Path, junit_xml: Path, requires_json: Path) -> int:
    """Upgrade one drifted package at a time (with what it needs) in this locked environment, rerun the failed
    tests, put the lock back. Prints a BROKEN-BY line per release that fails them on its own."""
    locked, newest = parse(lock.read_text()), parse(newest_freeze.read_text())
    tests = failed_tests(junit_xml)
    if not tests:
        print("blame: no failed test in the report")
        return 0
    changed = moved(locked, newest)
    tried = roots(changed, json.loads(requires_json.read_text()))
    drifted = [newest[k] for k in tried]
    print(
        f"blame: {len(tests)} failed tests; {len(changed)} packages drifted; trying {len(tried)} of them one at a "
        f"time (the rest come with these): {', '.join(tried)}"
    )
    restore(locked)  # start from the recorded set
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    broken = []
    for name, version in drifted:
        if subprocess.run([*pip, f"{name}=={version}"]).returncode != 0:
            print(f"blame: {name}=={version} does not install beside the locked set; skipped")
            continue
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            first = next((line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
            broken.append(f"{name} {locked.get(normalize(name), ('', 'none'))[1]} -> {version}")
            print(f"BROKEN-BY: {broken[-1]} (alone, it fails the tests the newest set failed: {first})")
        restore(locked)
    if not broken:
        print("blame: no single release breaks them on its own (a combination does); see the drift list above")
    return 1 if broken else 0


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        print(__doc__)
        return 0 if argv else 2
    cmd, args = argv[0], [Path(a) for a in argv[1:]]
    if cmd == "write" and len(args) == 1:
        write(args[0])
        return 0
    if cmd == "freeze" and len(args) == 1:
        args[0].write_text(freeze() + "\n")
        return 0
    if cmd == "check" and len(args) == 1:
        lines = differences(parse(args[0].read_text()), parse(freeze()))
        for line in lines:
            print(f"versions: {line}")
        if lines:
            print(
                f"versions: this environment is not {args[0]} ({len(lines)} differences); if a dependency was "
                "added or its bounds changed on purpose, refresh the record: bash .ci/lock",
                file=sys.stderr,
            )
            return 1
        print(f"versions: this environment equals {args[0]}")
        return 0
    if cmd == "drift" and len(args) == 1:
        lines = differences(parse(args[0].read_text()), parse(freeze()))
        print(f"drift: {len(lines)} packages differ from {args[0]} in the newest set")
        for line in lines:
            print(f"drift: {line}")
        return 0
    if cmd == "requires" and len(args) == 1:
        args[0].write_text(json.dumps(requires(), indent=1, sort_keys=True) + "\n")
        return 0
    if cmd == "blame" and len(args) == 4:
        return blame(*args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

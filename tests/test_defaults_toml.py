"""configs/defaults.toml lists every config key with its default: every field of the Config dataclass tree, and
every key of every method's settings (LeapAlign's in `[method]`, the other methods' as comment lines
`# <method>: method.<key> = <default as TOML>`)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path

from leapalign_fast.config import Config

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = ROOT / "configs" / "defaults.toml"
ACTIVE_METHOD = "leapalign"  # the method whose keys `[method]` holds


def _settings_classes() -> dict[str, type]:
    """Method name -> its settings dataclass, from the methods registry (the one line to change if it moves)."""
    from leapalign_fast.methods import METHODS

    return {name: spec.settings for name, spec in METHODS.items()}


COMMENT = re.compile(r"^#\s*(?P<method>\w+):\s*method\.(?P<key>\w+)\s*=\s*(?P<value>.+)$")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise AssertionError(f"field {f.name} has no default")


def _config_defaults(cls, prefix: str = "") -> dict[str, object]:
    """Dotted path -> default of every field of the dataclass tree under `cls` (tables and their keys)."""
    out: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, value = prefix + f.name, _default(f)
        out[path] = value
        if path == "method":  # the method's settings: its keys depend on `name`, checked by (b) in `problems`
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_config_defaults(hints[f.name], path + "."))
    return out


def _lookup(table: dict, path: str):
    node = table
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _same(a, b) -> bool:
    """TOML value vs dataclass default: ints and floats compare by value, but a bool is never a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def problems(text: str) -> list[str]:
    """What defaults.toml text `text` lacks or gets wrong, one line each naming the key; [] when complete."""
    out: list[str] = []
    data = tomllib.loads(text)

    # (a) every field of the Config tree, with its default (`method` is the raw table: its keys are checked below)
    for path, default in _config_defaults(Config).items():
        try:
            value = _lookup(data, path)
        except KeyError:
            out.append(f"missing key: {path}")
            continue
        if path == "method" or dataclasses.is_dataclass(default):
            continue
        if not _same(value, default):
            out.append(f"wrong default: {path} = {value!r}, the dataclass says {default!r}")

    # (b) every method's settings keys: LeapAlign's in [method], the others' in comment lines
    written: dict[tuple[str, str], object] = {}
    for line in text.splitlines():
        m = COMMENT.match(line.strip())
        if m:
            key = (m["method"], m["key"])
            if key in written:
                out.append(f"listed twice: {m['method']}: method.{m['key']}")
            try:
                written[key] = tomllib.loads(f"v = {m['value']}")["v"]
            except tomllib.TOMLDecodeError:
                out.append(f"not a TOML value: {line.strip()}")
    method_table = data.get("method", {})
    classes = _settings_classes()
    for name, key in written:
        if name not in classes:
            out.append(f"unknown method in a comment line: {name}: method.{key}")
        elif key not in {f.name for f in dataclasses.fields(classes[name])}:
            out.append(f"method '{name}' has no key method.{key}")
    for name, cls in classes.items():
        for f in dataclasses.fields(cls):
            default = _default(f)
            where = f"{name}: method.{f.name}"
            if (name, f.name) in written:
                if not _same(written[(name, f.name)], default):
                    out.append(f"wrong default: {where} = {written[(name, f.name)]!r}, the dataclass says {default!r}")
            elif f.name in method_table and (name == ACTIVE_METHOD or _same(method_table[f.name], default)):
                # [method] holds LeapAlign's keys; another method's key is covered there only at its own default
                if not _same(method_table[f.name], default):
                    out.append(f"wrong default: {where} = {method_table[f.name]!r}, the dataclass says {default!r}")
            else:
                out.append(f"missing key: {where}")
    return out


def test_defaults_toml_lists_every_config_key_and_every_method_key_with_its_default():
    assert problems(DEFAULTS.read_text()) == []


def test_the_active_method_table_is_leapalign():
    assert tomllib.loads(DEFAULTS.read_text())["method"]["name"] == ACTIVE_METHOD


def test_the_check_reports_a_removed_key():
    """The check can fail: remove one line (a Config key, a [method] key, a comment line) and it names that key."""
    text = DEFAULTS.read_text()

    def without(pattern: str) -> str:
        lines = text.splitlines(keepends=True)
        hits = [i for i, line in enumerate(lines) if re.match(pattern, line)]
        assert len(hits) == 1, pattern
        return "".join(lines[: hits[0]] + lines[hits[0] + 1 :])

    assert problems(without(r"warmup_steps\s*=")) == ["missing key: warmup_steps"]
    assert problems(without(r"reward_first\s*=")) == ["missing key: leapalign: method.reward_first"]
    assert problems(without(r"# refl: method\.late_steps =")) == ["missing key: refl: method.late_steps"]
    # and a wrong default in a comment line
    changed = text.replace("# refl: method.late_steps = 0", "# refl: method.late_steps = 3")
    assert problems(changed) == ["wrong default: refl: method.late_steps = 3, the dataclass says 0"]

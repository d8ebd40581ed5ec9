"""bench/compare_runs.py pairs two runs files of bench/quality.py seed by seed."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))

from bench import compare_runs  # noqa: E402


def _write(path: Path, rows: dict) -> Path:
    path.write_text(
        "".join(json.dumps({"task": [m, s], "table": t, "rewards": []}) + "\n" for (m, s), t in rows.items())
    )
    return path


def test_pairs_by_seed_and_checks_the_base(tmp_path):
    base = {("base", s): {"overall": 0.1 + s / 1000} for s in (1, 2, 3)}
    a = _write(
        tmp_path / "a.jsonl", {**base, **{("m", s): {"overall": 0.2 + 0.01 * s, "reward": 1.0} for s in (1, 2, 3)}}
    )
    b = _write(tmp_path / "b.jsonl", {**base, **{("m", s): {"overall": 0.2, "reward": 1.0} for s in (3, 2, 1, 4)}})
    assert compare_runs.main([str(a), str(b), "--method", "m", "--name", "x", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "x.json").read_text())
    assert res["seeds"] == [1, 2, 3] and res["base_identical"]
    assert res["metrics"]["overall"]["per_seed"] == pytest.approx([0.01, 0.02, 0.03])
    assert res["metrics"]["overall"]["diff"] == pytest.approx(0.02) and res["metrics"]["overall"]["wins"] == 3
    assert res["metrics"]["reward"]["diff"] == 0 and "| overall | +0.0200" in (tmp_path / "x.md").read_text()
    _write(b, {**{k: {"overall": 0.5} for k in base}, **{("m", s): {"overall": 0.2} for s in (1, 2, 3)}})
    assert not compare_runs.compare(compare_runs.read_runs(a), compare_runs.read_runs(b), "m")["base_identical"]


def test_too_few_shared_seeds_or_a_bad_line_is_one_message(tmp_path):
    a = _write(tmp_path / "a.jsonl", {("m", 1): {"overall": 0.1}})
    with pytest.raises(SystemExit, match="has 1 seed"):
        compare_runs.compare(compare_runs.read_runs(a), compare_runs.read_runs(a), "m")
    (tmp_path / "bad.jsonl").write_text('{"no_task": 1}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1 is not a bench/quality.py run line"):
        compare_runs.read_runs(tmp_path / "bad.jsonl")

"""Two runs of one toy-benchmark method, seed by seed: how far apart are they?

    python bench/compare_runs.py bench/results/quality_toy_test_leapalign_reward_first_runs.jsonl \
        bench/results/quality_toy_test_pref_runs.jsonl --method leapalign --name quality_toy_test_leapalign_orders

Reads two `*_runs.jsonl` files written by `bench/quality.py` (one line per (method, seed) run), pairs the runs of
`--method` by seed, and reports per metric A - B: mean [95% t interval], paired t, two-sided p, seeds where A > B,
and the per-seed differences; plus whether the `base` runs of the shared seeds are identical (same evaluation noise
and model: then the difference is the training's alone). Used for a change that should not move results (e.g. a
reimplementation of the same gradient): what float round-off alone does to a 100-step run. Writes JSON and
markdown under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench.stats import paired  # noqa: E402

METRICS = ("overall", "heldout", "reward", "ood_reward", "colour_entropy")


def read_runs(path: Path) -> dict[tuple[str, int], dict]:
    """{(method, seed): the run's evaluation table} of one runs file."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            run = json.loads(line)
            try:
                method, seed = run["task"][:2]
                out[method, int(seed)] = run["table"]
            except (KeyError, TypeError, ValueError) as e:
                raise SystemExit(f"compare_runs: {path}:{n} is not a bench/quality.py run line ({e})") from e
    return out


def compare(a: dict, b: dict, method: str) -> dict:
    seeds = sorted(s for m, s in a if m == method and (m, s) in b)
    if len(seeds) < 2:
        raise SystemExit(f"compare_runs: method '{method}' has {len(seeds)} seed(s) in both files; need >= 2")
    base = [s for s in seeds if ("base", s) in a and ("base", s) in b]
    out = {
        "method": method,
        "seeds": seeds,
        "base_identical": bool(base) and all(a["base", s] == b["base", s] for s in base),
        "metrics": {},
    }
    for key in METRICS:
        if all(key in a[method, s] and key in b[method, s] for s in seeds):
            xa, xb = [a[method, s][key] for s in seeds], [b[method, s][key] for s in seeds]
            out["metrics"][key] = {**paired(xa, xb), "per_seed": [x - y for x, y in zip(xa, xb)]}
    return out


def markdown(res: dict, a: Path, b: Path) -> str:
    lines = [
        f"A = `{a}`, B = `{b}`, method `{res['method']}`, seeds {res['seeds']}; base runs identical: "
        f"{res['base_identical']}.",
        "",
        "| metric | A - B | t | p | A > B | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for key, m in res["metrics"].items():
        lines.append(
            f"| {key} | {m['diff']:+.4f} [{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}] | {m['t']:.2f} | {m['p']:.3f} | "
            f"{m['wins']}/{m['n']} | {' '.join(f'{x:+.3f}' for x in m['per_seed'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--method", required=True)
    p.add_argument("--name", default="compare_runs")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    from bench.common import write_result

    res = compare(read_runs(args.a), read_runs(args.b), args.method)
    args.out.mkdir(parents=True, exist_ok=True)
    write_result(args.out / f"{args.name}.json", {"a": str(args.a), "b": str(args.b), **res})
    md = markdown(res, args.a, args.b)
    (args.out / f"{args.name}.md").write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

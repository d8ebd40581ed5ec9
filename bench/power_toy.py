"""How many seeds the toy benchmark needs: a power estimate from the measured seed-to-seed spread of its paired
differences (bench/quality.py's per-seed tables; no training).

    python bench/power_toy.py bench/results/quality_toy_test_pref_all_from_runs.json --name quality_toy_power

For the score `--column` (default `overall`, the GenEval-style one; `strict` where the runs have it), per method
against base and per pair of methods: the standard deviation over seeds of the paired (same-seed) difference, and
the seeds a paired t-test needs (bench/stats.py: seeds_needed, 95% two-sided, power 0.8) to find a true difference
of the observed size and of fixed sizes, and the seeds for a 95% interval of +-h (seeds_for_halfwidth: the question
"is there a difference of 2h or more" answered either way). The spread is itself estimated from few seeds: with 8
seeds its 95% interval is about 0.66 to 2.0 times the estimate, so the seed counts are a floor, not a promise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from bench.stats import mean_ci, paired, sd_ratio_interval, seeds_for_halfwidth, seeds_needed  # noqa: E402

DELTAS = (0.01, 0.02, 0.03, 0.05)
HALFWIDTHS = (0.01, 0.02)


def spread(per_seed: dict, column: str) -> dict:
    """Paired differences over the seeds every method has: vs base per method, and per pair of methods."""
    methods = [m for m in per_seed if m != "base"]
    seeds = sorted(set.intersection(*(set(runs) for runs in per_seed.values())), key=int)
    value = lambda m: [per_seed[m][s]["table"][column] for s in seeds]  # noqa: E731

    def diff(a, b):
        return {**paired(value(a), value(b)), "sd": mean_ci([x - y for x, y in zip(value(a), value(b))])["std"]}

    vs_base = {m: diff(m, "base") for m in methods}
    between = {f"{a} - {b}": diff(a, b) for a, b in itertools.combinations(methods, 2)}
    return {"seeds": seeds, "vs_base": vs_base, "between": between}


def plan(sd: float, observed: float) -> dict:
    return {
        "observed": seeds_needed(sd, observed, n_max=10_000),
        **{f"delta {d}": seeds_needed(sd, d, n_max=10_000) for d in DELTAS},
        **{f"halfwidth {h}": seeds_for_halfwidth(sd, h, n_max=10_000) for h in HALFWIDTHS},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a bench/quality.py result JSON (its per_seed tables)")
    p.add_argument("--column", default="overall", help="the score: overall (GenEval-style), strict, heldout, ...")
    p.add_argument("--name", required=True, help="output: bench/results/<name>.{json,md}")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    per_seed = json.loads(args.runs.read_text())["per_seed"]
    if any(args.column not in r["table"] for runs in per_seed.values() for r in runs.values()):
        raise SystemExit(f"{args.runs} has no column {args.column!r} in every run; pick one its tables have")
    s = spread(per_seed, args.column)
    rows = {**{f"{m} - base": d for m, d in s["vs_base"].items()}, **s["between"]}
    plans = {k: plan(d["sd"], d["diff"]) for k, d in rows.items()}
    sds = sorted(d["sd"] for d in s["between"].values())
    typical = {"median between-method sd": statistics.median(sds), "largest between-method sd": sds[-1]}
    typical_plans = {k: plan(v, 0.0) for k, v in typical.items()}
    cols = ["observed", *(f"delta {d}" for d in DELTAS), *(f"halfwidth {h}" for h in HALFWIDTHS)]
    head = (
        "| difference | Δ (seeds above) | sd over seeds | seeds for Δ as observed | "
        + " | ".join(f"for Δ = {d}" for d in DELTAS)
        + " | "
        + " | ".join(f"for ±{h}" for h in HALFWIDTHS)
        + " |"
    )
    lo, hi = sd_ratio_interval(len(s["seeds"]))
    md = [
        f"Power estimate for `{args.column}` from `{args.runs.name}` (seeds {', '.join(s['seeds'])}, n = "
        f"{len(s['seeds'])}): seeds a paired t-test needs (95% two-sided, power 0.8) to find a true difference of "
        "the observed size and of fixed sizes, and seeds for a 95% interval of ±h. The sd is itself measured on "
        f"{len(s['seeds'])} seeds (the true sd lies within {lo:.2f}x to {hi:.2f}x of it, 95%; the seed counts scale "
        "with its square): read them as estimates, not guarantees.",
        "",
        head,
        "|---" * (len(cols) + 3) + "|",
    ]
    for k in [*(f"{m} - base" for m in s["vs_base"]), *s["between"]]:
        d, pl = rows[k], plans[k]
        md.append(
            f"| {k} | {d['diff']:+.3f} ({d['wins']}/{d['n']}) | {d['sd']:.3f} | "
            + " | ".join(str(pl[c]) if pl[c] <= 10_000 else "> 10000" for c in cols)
            + " |"
        )
    md += ["", "| between two methods | sd | " + " | ".join(c for c in cols[1:]) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, v in typical.items():
        md.append(f"| {k} | {v:.3f} | " + " | ".join(str(typical_plans[k][c]) for c in cols[1:]) + " |")
    text = "\n".join(md) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text)
    write_result(
        args.out / f"{args.name}.json",
        {
            "column": args.column,
            "source": str(args.runs),
            **s,
            "plans": plans,
            "typical": typical,
            "typical_plans": typical_plans,
        },
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

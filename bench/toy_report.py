"""The toy benchmark's summary tables for the docs, from a bench/quality.py result JSON (no training, no sampling).

    python bench/toy_report.py bench/results/quality_strict_test.json --name quality_strict_test_report

Writes bench/results/<name>.md: per method, the paired difference against base (mean [95% t interval], t, seeds
above base) of the GenEval-style score, the strict score, objects per image, the out-of-domain score and colour
entropy, beside the base model's own values; then every pair of methods on both scores (difference, interval, t)
with the pairs whose interval excludes 0 counted, and the paired-t threshold a Bonferroni correction over the pairs
asks for at this seed count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leapalign_fast.io import write_text_atomic  # noqa: E402

COLUMNS = (
    ("overall", "Δ GenEval-style"),
    ("strict", "Δ strict"),
    ("objects", "Δ objects per image"),
    ("ood_reward", "Δ out-of-domain score"),
    ("colour_entropy", "Δ colour entropy (bits)"),
)


def cell(d: dict, digits: int = 3) -> str:
    lo, hi = d["ci"]
    return f"{d['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] (t {d['t']:.2f}, {d['wins']}/{d['n']})"


def bonferroni_t(n_seeds: int, n_pairs: int, alpha: float = 0.05) -> float:
    """The two-sided paired-t threshold at level alpha / n_pairs with n_seeds - 1 degrees of freedom."""
    from bench.stats import t_quantile

    return t_quantile(1 - alpha / (2 * n_pairs), n_seeds - 1)


def report(result: dict) -> str:
    table, vs = result["table"], result["vs_base"]
    methods = sorted(vs, key=lambda m: -vs[m]["strict"]["diff"])
    n = table["base"]["overall"]["n"]
    seeds = result["settings"]["seeds"]
    out = [
        f"Seeds: {n} ({seeds}). Paired difference against base (same seed: same evaluation noise): mean [95% t "
        "interval] (paired t, seeds above base).",
        "",
        "| method | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
        "| base (its own value) | "
        + " | ".join(
            f"{table['base'][c]['mean']:.3f} [{table['base'][c]['ci'][0]:.3f}, {table['base'][c]['ci'][1]:.3f}]"
            for c, _ in COLUMNS
        )
        + " |",
    ]
    out += [
        f"| {m} | " + " | ".join(cell(vs[m][c], 2 if c in ("ood_reward",) else 3) for c, _ in COLUMNS) + " |"
        for m in methods
    ]
    pairs = list(itertools.combinations(sorted(vs), 2))
    threshold = bonferroni_t(n, len(pairs)) if n > 1 and pairs else float("nan")
    for key, title in (("between", "GenEval-style"), ("between_strict", "strict")):
        rows, resolved = [], 0
        for a, b in pairs:
            d = result[key][a][b]  # a − b (bench/quality.py stores both orders)
            diff, (lo, hi), t = d["diff"], d["ci"], d["t"]
            resolved += lo > 0 or hi < 0
            rows.append(f"| {a} − {b} | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] | {t:.2f} |")
        out += [
            "",
            f"Between methods, {title} score: paired difference over the same seeds, mean [95% t interval], paired t. "
            f"{resolved} of {len(rows)} intervals exclude 0 (at 95%, about {0.05 * len(rows):.1f} would by chance); "
            f"Bonferroni over {len(rows)} pairs at {n} seeds needs |t| ≥ {threshold:.2f}.",
            "",
            "| pair | difference | t |",
            "|---|---|---|",
            *rows,
        ]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", type=Path, help="a bench/quality.py result JSON")
    p.add_argument("--name", required=True, help="output: bench/results/<name>.md")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    text = report(json.loads(args.result.read_text()))
    cmd = "python bench/toy_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_text_atomic(args.out / f"{args.name}.md", f"Made by `{cmd}` from `{args.result}`.\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

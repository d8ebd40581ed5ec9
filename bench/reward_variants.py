"""Tabulate preference-reward records (the JSON bench/train_pref_reward.py writes beside each reward) side by side:
held-out agreement with the evaluator (pairwise accuracy and pass/fail AUC, 95% bootstrap intervals over captions),
the same per caption category, and the reward's 99th percentile on the generator's training-caption samples (the
scale a hinge margin is set against). Variants must share their validation pairs (same generator, samples and
annotator), else their numbers do not compare and the table refuses them.

    python bench/reward_variants.py "v1: dim 64=bench/results/toy_reward_strict_variants/v1.json" ... \
        --out bench/results/toy_reward_strict_variants.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leapalign_fast.io import write_text_atomic  # noqa: E402
from leapalign_fast.toy.scenes import CATEGORIES  # noqa: E402

SHARED = ("model", "annotator", "val_images", "per_caption", "sample_steps", "seed")


def _cell(a: dict, key: str) -> str:
    lo, hi = a[f"{key}_ci"]
    return f"{a[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def table(variants: dict[str, dict]) -> str:
    """Markdown: one row per variant, then the `--compare` scorers and the pair counts of the first record."""
    records = list(variants.items())
    first_name, first = records[0]
    for name, r in records[1:]:
        for key in SHARED:
            if r.get(key) != first.get(key):
                raise SystemExit(
                    f"{name}: {key} is {r.get(key)!r}, {first_name}'s {first.get(key)!r}: not the same pairs"
                )
        if r["agreement"]["validation"]["graded_pairs"] != first["agreement"]["validation"]["graded_pairs"]:
            raise SystemExit(f"{name}: other validation pairs than {first_name}'s")
    head = (
        "| variant | edited copies | pairwise accuracy | pass/fail AUC | "
        + " | ".join(f"{c} acc / AUC" for c in CATEGORIES)
        + " | p99 on training samples |"
    )
    lines = [head, "|---" * (5 + len(CATEGORIES)) + "|"]
    for name, r in records:
        a = r["agreement"]
        per = a["validation_by_category"]
        cats = " | ".join(f"{per[c]['pairwise_accuracy']:.2f} / {per[c]['auc']:.2f}" for c in CATEGORIES)
        lines.append(
            f"| {name} | {r.get('edited_images', 0)} | {_cell(a['validation'], 'pairwise_accuracy')} | "
            f"{_cell(a['validation'], 'auc')} | {cats} | {r['train_sample_reward_quantiles']['p99']:.1f} |"
        )
    others = [
        k for k in first["agreement"] if k not in ("validation", "validation_by_category", "validation_pass_rate")
    ]
    lines += ["", "The same validation pairs, scored by the `--compare` scorers (never trained on these samples):", ""]
    lines += [
        f"- {k}: pairwise {_cell(first['agreement'][k], 'pairwise_accuracy')}, AUC "
        + _cell(first["agreement"][k], "auc")
        for k in others
    ]
    per = first["agreement"]["validation_by_category"]
    counts = ", ".join(f"{c} {per[c]['graded_pairs']}" for c in CATEGORIES)
    lines += [
        "",
        f"Graded pairs per category (validation): {counts}; strict pass rate of the generator's validation samples "
        f"{first['agreement']['validation_pass_rate']:.3f}. Commands: each record's `environment.command`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="NAME=PATH of a reward record JSON, in table order")
    p.add_argument("--title", default="Preference-reward variants on one sample set")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    variants = {}
    for item in args.variants:
        name, sep, path = item.rpartition("=")
        if not sep or not name:
            raise SystemExit(f"{item!r}: give NAME=PATH")
        variants[name] = json.loads(Path(path).read_text())
    command = "python bench/reward_variants.py " + " ".join(f'"{v}"' for v in args.variants) + f" --out {args.out}"
    write_text_atomic(args.out, f"# {args.title}\n\nMade by `{command}`.\n\n" + table(variants))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Equal-budget tuning of every method on the toy benchmark's *validation* split: one lr grid, the same for every
method, the same steps, batch and sampling steps; each method keeps the lr with the best mean validation `--metric`
(`overall`, the GenEval-style pass, by default; `strict` for the strict score, which extra objects and speck
artefacts fail).

    python bench/tune_toy.py --lrs 5e-5 1e-4 2e-4 --seeds 0 1 --jobs 2

Runs `bench/quality.py --split validation --set lr=<lr> --eval-every K` once per lr (every method and the base model,
the given seeds), then writes bench/results/quality_toy_tuning.{md,json}: the grid (validation overall per method and
lr, mean over seeds), the chosen lr per method, the wall time and grad forwards per step, and a plot of validation
evaluator against training wall-clock per method at its chosen lr (quality_toy_tuning_validation_vs_time.png).
The JSON's "overrides" is what `bench/quality.py --per-method` reads for the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import quality  # noqa: E402
from bench.common import write_result  # noqa: E402


def choose(grid: dict[str, dict[str, float]]) -> dict[str, str]:
    """The lr with the highest validation overall per method (the smaller lr on a tie)."""
    return {m: max(sorted(by_lr, key=float), key=lambda lr: (by_lr[lr], -float(lr))) for m, by_lr in grid.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", nargs="+", default=["5e-5", "1e-4", "2e-4"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="*", default=quality.METHODS)
    p.add_argument("--images", type=int, default=24, help="validation images per category")
    p.add_argument("--metric", default="overall", help="the column each method's lr is chosen on: overall or strict")
    p.add_argument("--eval-every", type=int, default=25, help="trainer validation every K steps (the time curves)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides for every run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--name",
        default="quality_toy_tuning",
        help="output name: <name>.{md,json,png} and one <name>_lr<lr> benchmark per lr (the default keeps the first "
        "grid's quality_toy_tune_lr<lr> files)",
    )
    p.add_argument(
        "--reuse", action="store_true", help="an lr whose quality_toy_tune_lr<lr>.json exists is read, not rerun"
    )
    args, rest = p.parse_known_args(argv)
    t0 = time.perf_counter()
    runs = {}
    for lr in args.lrs:
        name = f"quality_toy_tune_lr{lr}" if args.name == "quality_toy_tuning" else f"{args.name}_lr{lr}"
        if not (args.reuse and (args.out / f"{name}.json").is_file()):
            quality.main(
                [
                    "--split",
                    "validation",
                    "--seeds",
                    *map(str, args.seeds),
                    "--methods",
                    *args.methods,
                    "--images",
                    str(args.images),
                    "--eval-every",
                    str(args.eval_every),
                    "--jobs",
                    str(args.jobs),
                    "--name",
                    name,
                    "--out",
                    str(args.out),
                    "--set",
                    f"lr={lr}",
                    *args.set,
                    *rest,
                ]
            )
        runs[lr] = json.loads((args.out / f"{name}.json").read_text())
    grid = {m: {lr: runs[lr]["table"][m][args.metric]["mean"] for lr in args.lrs} for m in args.methods}
    chosen = choose(grid)
    base = runs[args.lrs[0]]["table"]["base"][args.metric]["mean"]
    md = [
        f"Validation split, seeds {args.seeds}, {args.images} images per category; mean ± sd of {args.metric} over "
        f"seeds for each lr of one grid (same for every method; the rest of the config fixed: same steps, batch, "
        f"sampling steps). Base model: {base:.3f}.",
        "",
        "| method | "
        + " | ".join(f"lr {lr}" for lr in args.lrs)
        + " | chosen lr | Δ vs base at chosen | s/step | grad fwd/step |",
        "|---" * (len(args.lrs) + 5) + "|",
    ]
    for m in sorted(args.methods, key=lambda m: -grid[m][chosen[m]]):
        per_seed = runs[chosen[m]]["per_seed"][m].values()
        md.append(
            f"| {m} | "
            + " | ".join(f"{grid[m][lr]:.3f} ± {runs[lr]['table'][m][args.metric]['std']:.3f}" for lr in args.lrs)
            + f" | {chosen[m]} | "
            f"{grid[m][chosen[m]] - base:+.3f} | {np.mean([r['step_seconds'] for r in per_seed]):.2f} | "
            f"{np.mean([r['grad_forwards_per_step'] for r in per_seed]):.1f} |"
        )
    (args.out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    curves = {m: [r["validation"] for r in runs[chosen[m]]["per_seed"][m].values()] for m in args.methods}
    plot(curves, chosen, args.out / f"{args.name}_validation_vs_time.png")
    write_result(
        args.out / f"{args.name}.json",
        {
            "grid": grid,
            "chosen": chosen,
            "metric": args.metric,
            "base_overall": base,
            "overrides": {m: [f"lr={lr}"] for m, lr in chosen.items()},
            "seeds": args.seeds,
            "images": args.images,
            "curves": curves,
            "wall_seconds": time.perf_counter() - t0,
            "wall_seconds_per_lr": {lr: runs[lr]["wall_seconds"] for lr in args.lrs},
        },
    )
    print("\n".join(md))
    return 0


def plot(curves: dict, chosen: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m, vals in curves.items():
        vals = [v for v in vals if v]
        if vals:
            n = min(len(v) for v in vals)
            ax.plot(
                np.mean([[row["train_seconds"] for row in v[:n]] for v in vals], axis=0),
                np.mean([[row["val/evaluator"] for row in v[:n]] for v in vals], axis=0),
                marker=".",
                label=f"{m} (lr {chosen[m]})",
            )
    ax.set(
        xlabel="training wall-clock (s, excluding validation)",
        ylabel="validation evaluator (mean over seeds)",
        title="equal budget: each method at its tuned lr",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

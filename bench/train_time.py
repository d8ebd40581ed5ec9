"""Wall time of the trainer itself (`leapalign-fast train`), config variants interleaved round by round.

    python bench/train_time.py --variants method.reward_first=true method.reward_first=false --rounds 3
    python bench/train_time.py --config configs/tiny.toml --set max_steps=50 --variants lr=1e-4 lr=2e-4

bench/memory.py times single steps under allocator settings that make resident memory follow live memory (every
block of 64 KiB or more mapped fresh, the heap trimmed before each step), which charges page faults to the step
that allocates more; its times compare variants of equal memory. This script times what a user runs: each
variant is one `leapalign-fast train` process (a fresh output directory, the allocator's defaults), and its step
time is the median of `step_seconds` in metrics.jsonl after `--skip` warm-up steps; rounds run every variant once
in turn, and the ratio to the first variant is taken round by round (paired: median [min, max]). Writes JSON and
markdown under --out (a temporary directory with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def run_once(config: Path, overrides: list[str], out: Path, skip: int) -> dict:
    """One trainer process; its median step seconds after `skip` steps and its whole wall time."""
    cmd = [
        sys.executable,
        "-m",
        "leapalign_fast.cli",
        "train",
        "--config",
        str(config),
        f"output_dir={out}",
        "report_to=none",
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"bench/train_time.py: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    steps = [json.loads(line)["step_seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    if len(steps) <= skip:
        raise SystemExit(f"bench/train_time.py: {len(steps)} steps, need more than --skip {skip}")
    return {"step_seconds": statistics.median(steps[skip:]), "steps": len(steps), "wall_seconds": wall}


def summarize(rounds: list[dict[str, dict]], variants: list[str]) -> list[dict]:
    from bench.common import paired_ratio

    first = [r[variants[0]]["step_seconds"] for r in rounds]
    out = []
    for v in variants:
        steps = [r[v]["step_seconds"] for r in rounds]
        out.append(
            {
                "variant": v,
                "step_seconds": statistics.median(steps),
                "min": min(steps),
                "max": max(steps),
                "wall_seconds": statistics.median(r[v]["wall_seconds"] for r in rounds),
                "ratio_to_first_paired": paired_ratio(steps, first),
            }
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.toml")
    p.add_argument(
        "--variants",
        nargs="+",
        required=True,
        metavar="KEY=VALUE[;KEY=VALUE]",
        help="one config override set per variant (';' joins several); the first is the reference",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of each run's median")
    p.add_argument("--quick", action="store_true", help="2 rounds of 8 steps, temp output")
    p.add_argument("--name", default="train_time")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results (a temp dir with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.skip, args.set = min(args.rounds, 2), 2, [*args.set, "max_steps=8", "checkpoint_every=8"]
    from bench.common import write_result
    from leapalign_fast.threads import describe_threads

    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-train-time-")) if args.quick else ROOT / "bench" / "results")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            rounds.append({})
            for k, v in enumerate(args.variants):
                run_dir = Path(tmp) / f"r{i}v{k}"
                rounds[-1][v] = run_once(args.config, [*args.set, *filter(None, v.split(";"))], run_dir, args.skip)
                print(
                    f"round {i + 1} {v}: median step {rounds[-1][v]['step_seconds']:.4f} s, "
                    f"wall {rounds[-1][v]['wall_seconds']:.1f} s",
                    flush=True,
                )
    rows = summarize(rounds, args.variants)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": str(args.config),
        "set": args.set,
        "variants": args.variants,
        "rounds": rounds,
        "rows": rows,
        "threads": describe_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    write_result(out / f"{args.name}.json", payload)
    md = ["| variant | step s (median [min, max]) | wall s | / first (paired) |", "|---|---|---|---|"]
    for r in rows:
        q = r["ratio_to_first_paired"]
        md.append(
            f"| {r['variant']} | {r['step_seconds']:.4f} [{r['min']:.4f}, {r['max']:.4f}] | {r['wall_seconds']:.1f} | "
            f"{q['median']:.3f} [{q['min']:.3f}, {q['max']:.3f}] |"
        )
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print("wrote", out / f"{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Do the timing benchmarks hold up? Run each one twice, in fresh processes, and check that the two runs agree
within their own reported spread.

    python bench/reruns.py                  # CPU: bench/memory.py (mid, N=10, leapalign + full, 5 repeats) and
                                            # bench/sampler.py --quick, each twice (about 10 min on 2 quiet cores)
    python bench/reruns.py --quick          # CPU: the tiny model instead of mid (< 2 min; writes to a temp dir)

Agreement of one timing (a step time, a sampler variant's seconds, a round-by-round ratio): `agree` when the two
medians differ by no more than either run's own spread (max - min); `medians_inside` (stricter) when each run's
median lies inside the other run's [min, max]. Both runs' numbers go into the JSON (`bench/results/reruns_cpu.json`)
with
the load average before and after each run: on a shared machine a disagreement can be the machine's doing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def benchmarks(quick: bool) -> dict[str, list[str]]:
    model = ["--model", "tiny", "--steps", "10", "25"] if quick else ["--model", "mid", "--steps", "10"]
    return {
        "memory": ["bench/memory.py", *model, "--methods", "leapalign", "full", "--repeats", "5"],
        "sampler": ["bench/sampler.py", "--quick"],
    }


def timings(name: str, data: dict) -> dict[str, dict]:
    """{label: {median, min, max}} of one benchmark's JSON: every timed row and every round-by-round ratio."""
    out = {}
    if name == "memory":
        for r in data["rows"]:
            key = f"{r['method']} N={r['num_steps']} step s"
            out[key] = {"median": r["step_seconds"], "min": r["step_seconds_min"], "max": r["step_seconds_max"]}
        for r in data["ratios"]:
            method = r.get("method", "leapalign")  # results written before other methods had ratios
            out[f"full/{method} N={r['num_steps']} paired"] = dict(r["step_seconds_ratio_paired"])
    else:
        for r in data["rows"]:
            out[f"{r['variant']} {r['resolution']}px s"] = {
                "median": r["seconds_median"],
                "min": r["seconds_min"],
                "max": r["seconds_max"],
            }
            ratio = next(v for k, v in r.items() if k.startswith("time_ratio_vs_"))
            if r["variant"] != data["rows"][0]["variant"]:
                out[f"{r['variant']}/{data['rows'][0]['variant']} {r['resolution']}px paired"] = dict(ratio)
    return out


def agreement(a: dict, b: dict) -> dict:
    """Both runs' numbers; `agree`: the medians differ by at most each run's max - min; `medians_inside`: each
    median lies inside the other run's [min, max]."""
    inside = lambda x, r: r["min"] <= x <= r["max"]  # noqa: E731
    diff = abs(b["median"] - a["median"])
    return {
        "run1": a,
        "run2": b,
        "agree": diff <= a["max"] - a["min"] and diff <= b["max"] - b["min"],
        "medians_inside": inside(a["median"], b) and inside(b["median"], a),
        "median_change": (b["median"] - a["median"]) / a["median"],
    }


def run_twice(name: str, cmd: list[str], tmp: Path) -> tuple[list[dict], list[dict]]:
    runs, envs = [], []
    for i in (1, 2):
        out = tmp / f"{name}{i}"
        load = os.getloadavg()
        subprocess.run([sys.executable, *cmd, "--out", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        data = json.loads(next(out.glob("*.json")).read_text())
        runs.append(timings(name, data))
        envs.append(
            {
                "load_average_before": load,
                "load_average_after": os.getloadavg(),
                "wall_seconds": data.get("wall_seconds"),
                "command": data["environment"]["command"],
            }
        )
    return runs, envs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model; temp output")
    p.add_argument("--only", choices=["memory", "sampler"], nargs="+", default=None)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results (a temp dir with --quick)")
    p.add_argument("--tag", default="", help="suffix of the output file names (e.g. a second attempt)")
    args = p.parse_args(argv)
    from bench.common import write_result

    out = args.out or (Path(tempfile.mkdtemp(prefix="reruns-")) if args.quick else ROOT / "bench" / "results")
    result, lines = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in benchmarks(args.quick).items():
            if args.only and name not in args.only:
                continue
            (a, b), envs = run_twice(name, cmd, Path(tmp))
            rows = {k: agreement(a[k], b[k]) for k in a if k in b}
            result[name] = {
                "command": " ".join(cmd),
                "runs": envs,
                "timings": rows,
                "all_agree": all(r["agree"] for r in rows.values()),
                "all_medians_inside": all(r["medians_inside"] for r in rows.values()),
            }
            for k, r in rows.items():
                lines.append(
                    f"| {name} | {k} | {r['run1']['median']:.4g} [{r['run1']['min']:.4g}, {r['run1']['max']:.4g}] | "
                    f"{r['run2']['median']:.4g} [{r['run2']['min']:.4g}, {r['run2']['max']:.4g}] | "
                    f"{100 * r['median_change']:+.0f}% | {'yes' if r['agree'] else '**no**'} | "
                    f"{'yes' if r['medians_inside'] else 'no'} |"
                )
    out.mkdir(parents=True, exist_ok=True)
    name = "reruns_cpu" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    path = write_result(
        out / f"{name}.json",
        {
            "benchmarks": result,
            "agreement": "agree: |median2 - median1| <= "
            "max - min of each run; medians_inside: each median inside the other "
            "run's [min, max]",
        },
    )
    md = [
        "| benchmark | timing | run 1 median [min, max] | run 2 median [min, max] | change | within spread | "
        "medians inside |",
        "|---|---|---|---|---|---|---|",
        *lines,
    ]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

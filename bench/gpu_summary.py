"""Bookkeeping for bench/gpu_run.sh: record each stage's exit status, then merge every result into one JSON and
a markdown summary (the files that come back from the GPU machine).

    python bench/gpu_summary.py record WORK NAME RC SECONDS "COMMAND"
    python bench/gpu_summary.py summarize WORK OUT [--dry-run]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def record(work: Path, name: str, rc: str, seconds: str, command: str) -> None:
    status = {"0": "ok", "124": "timed out", "137": "killed (time or memory)", "skipped": "skipped"}.get(rc, "failed")
    with open(work / "commands.jsonl", "a") as f:
        f.write(
            json.dumps({"stage": name, "command": command, "exit": rc, "status": status, "seconds": int(seconds)})
            + "\n"
        )


def _fmt(x, digits=2):
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def tables(results: dict[str, dict]) -> list[str]:
    md = []
    for name, data in sorted(results.items()):
        rows = data.get("rows") or []
        if name.startswith("kernels"):
            md += [
                f"### {name}",
                "",
                "| B | impl | fwd ms | bwd ms | fwd+bwd ms | speed-up (fwd+bwd, paired) |",
                "|---|---|---|---|---|---|",
            ]
            for r in rows:
                sp = r.get("full_speedup_vs_reference_paired", {})
                md.append(
                    f"| {r['batch']} | {r['impl']} | {_fmt(r['forward_ms_p20_p50_p80'][1], 3)} | "
                    f"{_fmt(r['backward_ms_p20_p50_p80'][1], 3)} | {_fmt(r['full_ms_p20_p50_p80'][1], 3)} | "
                    f"{_fmt(sp.get('median'))} [{_fmt(sp.get('min'))}, {_fmt(sp.get('max'))}] |"
                )
        elif name.startswith("sampler"):
            md += [
                f"### {name}",
                "",
                "| res | variant | img/s (median) | spread | vs the pipeline (paired) | peak MiB |",
                "|---|---|---|---|---|---|",
            ]
            for r in rows:
                sp = r.get("speedup_vs_pipeline", {})
                sp = sp if isinstance(sp, dict) else {"median": sp}
                md.append(
                    f"| {r['resolution']} | {r['variant']} | {_fmt(r['images_per_second'], 3)} | "
                    f"{_fmt(100 * r.get('spread', 0), 0)}% | {_fmt(sp.get('median'))} [{_fmt(sp.get('min'))}, "
                    f"{_fmt(sp.get('max'))}] | {_fmt(r.get('peak_mib'), 0)} |"
                )
        elif name.startswith("memory"):
            md += [
                f"### {name}",
                "",
                "| method | N | res | activation MiB | transformer | decode+reward | peak MiB | step s |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                if r.get("oom"):
                    md.append(f"| {r['method']} | {r['num_steps']} | {r['resolution']} | OOM | | | | |")
                    continue
                p = r.get("activation_by_part_mib", {})
                md.append(
                    f"| {r['method']} | {r['num_steps']} | {r['resolution']} | {_fmt(r['activation_mib'], 0)} | "
                    f"{_fmt(p.get('transformer'), 0)} | {_fmt(p.get('decode_reward'), 0)} | "
                    f"{_fmt(r.get('peak_mib'), 0)} | {_fmt(r.get('step_seconds'))} |"
                )
        elif name.startswith("train_steps"):
            md += [
                f"### {name}",
                "",
                f"- seconds per step: {[round(s, 2) for s in data.get('step_seconds', [])]}",
                f"- peak GPU memory: {_fmt(data.get('peak_gpu_mib'), 0)} MiB; compiled graphs: "
                f"{data.get('compiled_graphs')}",
                f"- losses: {data.get('losses')}",
            ]
        md.append("")
    return md


def summarize(work: Path, out: Path, dry: bool) -> None:
    commands = (
        [json.loads(x) for x in (work / "commands.jsonl").read_text().splitlines()]
        if (work / "commands.jsonl").is_file()
        else []
    )
    results = {p.stem: json.loads(p.read_text()) for p in sorted((work / "results").rglob("*.json"))}
    env = next((r["environment"] for r in results.values() if "environment" in r), None)
    if env is None:
        try:
            from bench.common import environment

            env = environment()
        except Exception as e:  # torch missing: the commands still say what happened
            env = {"error": repr(e)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(
        json.dumps(
            {"dry_run": dry, "environment": env, "commands": commands, "results": results}, indent=1, sort_keys=True
        )
        + "\n"
    )
    md = [
        f"# GPU run{' (dry run: nothing measured)' if dry else ''}: {env.get('gpu') or 'no GPU'}",
        "",
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, diffusers "
        f"{env.get('diffusers')}, "
        f"driver {env.get('driver')}, {env.get('date')}",
        "",
        "| stage | status | seconds | command |",
        "|---|---|---|---|",
    ]
    md += [f"| {c['stage']} | {c['status']} ({c['exit']}) | {c['seconds']} | `{c['command']}` |" for c in commands]
    md += ["", *tables(results)]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[: 6 + len(commands)]))


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
    elif argv[:1] == ["record"] and len(argv) == 6:
        record(Path(argv[1]), *argv[2:])
    elif argv[:1] == ["summarize"] and len(argv) in (3, 4):
        summarize(Path(argv[1]), Path(argv[2]), "--dry-run" in argv)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

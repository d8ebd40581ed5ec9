"""Bookkeeping for bench/gpu_run.sh. Every benchmark appends its rows to one JSONL file under $OUT the moment each
is measured (`--jsonl`); this script adds the environment and each stage's exit status to the same file, and
rewrites the summary files from it after every stage. Only `environment` imports torch.

    python bench/gpu_summary.py environment RESULTS.jsonl            # GPU name, versions, driver (one row)
    python bench/gpu_summary.py record RESULTS.jsonl NAME RC SECONDS "COMMAND"
    python bench/gpu_summary.py summarize OUT [--dry-run]            # OUT/results.jsonl -> gpu_results.json, summary.md
    python bench/gpu_summary.py carry ROOT LIMIT_MIB [PATH ...]      # the size of what a device call carries
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

STATUS = {"0": "ok", "124": "timed out", "137": "killed (time or memory)", "143": "stopped", "skipped": "skipped"}


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def environment(path: Path) -> None:
    """The machine and versions (versions from the installed metadata: importing diffusers and transformers
    here would cost seconds; the stages import them anyway)."""
    import datetime
    import importlib.metadata
    import platform

    import torch

    cuda = torch.cuda.is_available()
    row = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_mib": torch.cuda.get_device_properties(0).total_memory / 2**20 if cuda else None,
        "cpu_count": os.cpu_count(),
    }
    for dist in ("triton", "diffusers", "transformers", "peft", "accelerate"):
        try:
            row[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            row[dist] = None
    if cuda:
        try:
            import pynvml

            pynvml.nvmlInit()
            row["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # NVML missing is worth recording, not fatal
            row["driver"] = f"unknown ({type(e).__name__})"
    try:
        import leapalign_fast

        row["leapalign_fast"] = str(Path(leapalign_fast.__file__).resolve().parent)
    except ImportError as e:
        row["leapalign_fast"] = repr(e)
    _append(path, {"bench": "environment", **row})
    print(
        f"environment: {row.get('gpu') or 'no GPU'}, torch {row['torch']}, triton {row.get('triton')}, diffusers "
        f"{row.get('diffusers')}, transformers {row.get('transformers')}; leapalign_fast from {row['leapalign_fast']}"
    )


def record(path: Path, name: str, rc: str, seconds: str, command: str) -> None:
    status = STATUS.get(rc, "failed")
    row = {"bench": "stage", "stage": name, "command": command, "exit": rc, "status": status, "seconds": int(seconds)}
    _append(path, row)


def read_rows(path: Path) -> list[dict]:
    """Every complete row; a last line cut off by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().split("\n"):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _fmt(x, digits=2):
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _mid(r: dict, key: str):
    q = r.get(key)
    return q[1] if q else None


def tables(by_bench: dict[str, list[dict]]) -> list[str]:
    md = []
    if rows := by_bench.get("memory"):
        md += [
            "### memory (the trainer's step on random full-size weights)",
            "",
            "| model | method | N | res | activation MiB | transformer | decode+reward | peak MiB | step s (median) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r.get("oom"):
                md.append(f"| {r.get('model')} | {r['method']} | {r['num_steps']} | {r['resolution']} | OOM | | | | |")
                continue
            p = r.get("activation_by_part_mib", {})
            step = _fmt(r.get("step_seconds")) + (" (timed step OOM)" if r.get("timing_oom") else "")
            md.append(
                f"| {r.get('model')} | {r['method']} | {r['num_steps']} | {r['resolution']} | "
                f"{_fmt(r.get('activation_mib'), 1)} | {_fmt(p.get('transformer'), 1)} | "
                f"{_fmt(p.get('decode_reward'), 1)} | {_fmt(r.get('peak_mib', r.get('peak_rss_mib')), 0)} | {step} |"
            )
        md.append("")
    if rows := by_bench.get("kernels"):
        md += [
            "### kernels (connect_discount, Triton vs eager PyTorch)",
            "",
            "| shape | MiB/tensor | impl | fwd ms | bwd ms | fwd+bwd ms | fwd GB/s | bwd GB/s | "
            "speed-up (fwd+bwd, paired) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            sp = r.get("full_speedup_vs_reference_paired") or {}
            md.append(
                f"| {r['batch']}x{r['tokens']}x{r['channels']} | {_fmt(r.get('tensor_mib'), 1)} | {r['impl']} | "
                f"{_fmt(_mid(r, 'forward_ms_p20_p50_p80'), 3)} | {_fmt(_mid(r, 'backward_ms_p20_p50_p80'), 3)} | "
                f"{_fmt(_mid(r, 'full_ms_p20_p50_p80'), 3)} | {_fmt(r.get('forward_gbps'), 0)} | "
                f"{_fmt(r.get('backward_gbps'), 0)} | {_fmt(sp.get('median'))} [{_fmt(sp.get('min'))}, "
                f"{_fmt(sp.get('max'))}] |"
            )
        md.append("")
    if rows := by_bench.get("sampler"):
        md += [
            "### sampler (denoising only; vs the family's diffusers pipeline)",
            "",
            "| res | variant | img/s (median) | spread | vs the pipeline | peak MiB | max abs diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r.get("oom"):
                md.append(f"| {r['resolution']} | {r['variant']} | OOM | | | | |")
                continue
            md.append(
                f"| {r['resolution']} | {r['variant']} | {_fmt(r.get('images_per_second'), 3)} | "
                f"{_fmt(100 * r.get('spread', 0), 0)}% | {_fmt(r.get('speedup_vs_pipeline'))} | "
                f"{_fmt(r.get('peak_mib'), 0)} | {_fmt(r.get('max_abs_diff_vs_pipeline'), 4)} |"
            )
        md.append("")
    if rows := by_bench.get("train_steps"):
        md += ["### training steps (shipped LoRA config, random full-size weights, colour reward)", ""]
        for r in rows:
            what = f"compile={r.get('compile')}, cuda_graph={r.get('cuda_graph')}"
            if "step" in r:
                m = r["step"]
                md.append(f"- {what}: step {m.get('step')} took {_fmt(m.get('step_seconds'))} s, loss {m.get('loss')}")
            elif r.get("oom"):
                md.append(f"- {what}: out of memory ({r.get('error')})")
            else:
                md.append(
                    f"- {what}: {r.get('steps')} steps, seconds per step "
                    f"{[round(s, 2) for s in r.get('step_seconds', [])]}, peak {_fmt(r.get('peak_gpu_mib'), 0)} MiB, "
                    f"compiled graphs {r.get('compiled_graphs')}"
                )
        md.append("")
    return md


def summarize(out: Path, dry: bool) -> None:
    rows = read_rows(out / "results.jsonl")
    env = next((r for r in rows if r.get("bench") == "environment"), {})
    stages = [r for r in rows if r.get("bench") == "stage"]
    by_bench: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("bench") not in ("environment", "stage", None):
            by_bench.setdefault(r["bench"], []).append(r)
    payload = {"dry_run": dry, "environment": env, "commands": stages, "results": by_bench}
    tmp = out / ".gpu_results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, out / "gpu_results.json")
    md = [
        f"# GPU run{' (CPU check: nothing measured on a GPU)' if dry else ''}: {env.get('gpu') or 'no GPU'}",
        "",
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, diffusers "
        f"{env.get('diffusers')}, transformers {env.get('transformers')}, driver {env.get('driver')}, "
        f"{env.get('date')}; leapalign_fast from {env.get('leapalign_fast')}",
        "",
        "| stage | status | seconds | command |",
        "|---|---|---|---|",
    ]
    md += [f"| {c['stage']} | {c['status']} ({c['exit']}) | {c['seconds']} | `{c['command']}` |" for c in stages]
    md += ["", *tables(by_bench)]
    tmp = out / ".summary.md.tmp"
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, out / "summary.md")
    print("\n".join(md[: 6 + len(stages)]))


def carry(root: Path, limit_mib: float, extra: list[str]) -> int:
    """The bytes a device call sends: the files git tracks plus the untracked ones it does not ignore (what
    travels), plus the carried paths (ignored folders such as .whl); links count as links."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        files, how = {root / p.decode() for p in listed if p}, "git ls-files"
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but .gitignore's patterns
        import fnmatch

        gitignore = root / ".gitignore"
        patterns = [x.strip().strip("/") for x in (gitignore.read_text() if gitignore.is_file() else "").splitlines()]
        patterns = [x for x in patterns if x and not x.startswith("#")] + [".git"]
        files, how = set(), ".gitignore patterns"
        for f in root.rglob("*"):
            parts = f.relative_to(root).parts
            if (f.is_file() or f.is_symlink()) and not any(fnmatch.fnmatch(c, x) for c in parts for x in patterns):
                files.add(f)
    for e in extra:
        p = root / e
        files |= {f for f in p.rglob("*") if f.is_file() or f.is_symlink()} if p.is_dir() else {p}
    total = sum(f.lstat().st_size for f in files if f.is_symlink() or f.exists())
    row = {
        "bench": "carry",
        "mib": round(total / 2**20, 2),
        "limit_mib": limit_mib,
        "files": len(files),
        "listed_by": how,
        "carried": extra,
        "fits": total <= limit_mib * 2**20,
    }
    print(json.dumps(row))
    return 0 if row["fits"] else 1


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
    elif argv[:1] == ["environment"] and len(argv) == 2:
        environment(Path(argv[1]))
    elif argv[:1] == ["record"] and len(argv) == 6:
        record(Path(argv[1]), *argv[2:])
    elif argv[:1] == ["summarize"] and len(argv) in (2, 3):
        summarize(Path(argv[1]), "--dry-run" in argv)
    elif argv[:1] == ["carry"] and len(argv) >= 3:
        return carry(Path(argv[1]), float(argv[2]), argv[3:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Blocking time of a sharded (FSDP, DCP) checkpoint, synchronous vs asynchronous, as a ratio of step time.

    python bench/checkpoint.py                 # CPU, 2 processes (gloo): the largest tiny-FLUX that fits this
                                               # machine (6 double + 12 single blocks, width 512: 106M parameters)
    python bench/checkpoint.py --nproc 8 --model config --config configs/flux_leapalign_full.toml \\
        model.source=black-forest-labs/FLUX.1-dev prompts=hpdv2-train          # GPU: full-size FLUX.1-dev, 8 GPUs

Each mode (async_checkpoint=false, then true) is one `torchrun` launch of the trainer itself: `--steps` optimizer
steps with a checkpoint every `--every`. The trainer logs every committed save to `checkpoints.jsonl` (seconds the
loop was held; seconds until the commit) and every step to `metrics.jsonl` (`step_seconds`, which excludes the
save). Reported per mode: blocking seconds per checkpoint (median), median step seconds, their ratio, and the
step time of the steps that ran while an asynchronous write was still going (the contention it costs).
Writes bench/results/checkpoint_<hardware>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import slug, write_result  # noqa: E402

MODELS = {  # overrides of the library defaults (tiny FLUX classes, colour reward)
    "cpu-large": [
        "model.tiny.layers=6",
        "model.tiny.single_layers=12",
        "model.tiny.heads=8",
        "model.tiny.head_dim=64",
        "model.tiny.text_dim=64",
        "batch_size=1",
        "num_steps=4",
        "resolution=64",
    ],
    "tiny": ["batch_size=2", "num_steps=4"],
    "config": [],  # the --config file as it is (full-size FLUX on GPUs)
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(args, asynchronous: bool, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    settings = [
        *MODELS[args.model],
        f"output_dir={out}",
        f"max_steps={args.steps}",
        f"checkpoint_every={args.every}",
        "keep_checkpoints=1",
        "fsdp=true",
        f"async_checkpoint={str(asynchronous).lower()}",
        "report_to=none",
        *args.overrides,
    ]
    config = ["--config", str(args.config)] if args.config else ["--config", str(ROOT / "configs" / "defaults.toml")]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.nproc),
        "--master_port",
        str(_port()),
        "-m",
        "leapalign_fast.cli",
        "train",
        *config,
        *settings,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    saves = [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    saved = {s["step"] for s in saves}
    plain = [r["step_seconds"] for r in steps[1:] if r["step"] - 1 not in saved]  # step 1: warm-up
    after = [r["step_seconds"] for r in steps if r["step"] - 1 in saved]  # ran while an async write went on
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    shard_bytes = sum(p.stat().st_size for p in (last / "shards").iterdir())
    blocking = statistics.median(s["blocking_s"] for s in saves)
    step_s = statistics.median(plain)
    return {
        "asynchronous": asynchronous,
        "command": " ".join(cmd[1:]),
        "wall_seconds": round(wall, 1),
        "checkpoints": saves,
        "checkpoint_gb": round(shard_bytes / 1e9, 3),
        "blocking_s_median": round(blocking, 4),
        "step_s_median": round(step_s, 4),
        "blocking_over_step": round(blocking / step_s, 4),
        "committed_after_s_median": round(statistics.median(s["committed_after_s"] for s in saves), 4),
        "step_s_after_save_median": round(statistics.median(after), 4) if after else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="cpu-large")
    p.add_argument("--config", type=Path, default=None, help="run config (with --model config: the model's)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/checkpoint_<hw>.json)")
    p.add_argument("--workdir", type=Path, default=None, help="run directories (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    modes = {name: run_mode(args, a, work / name) for name, a in (("sync", False), ("async", True))}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out = args.out or ROOT / "bench" / "results" / f"checkpoint_{slug(gpu)}.json"
    payload = {
        "model": args.model,
        "nproc": args.nproc,
        "steps": args.steps,
        "every": args.every,
        "overrides": args.overrides,
        "modes": modes,
        "async_blocking_vs_sync": round(modes["async"]["blocking_s_median"] / modes["sync"]["blocking_s_median"], 4),
    }
    write_result(out, payload)
    for name, m in modes.items():
        print(
            f"{name}: blocking {m['blocking_s_median']:.3f} s per checkpoint ({m['checkpoint_gb']} GB of shards), "
            f"step {m['step_s_median']:.3f} s, ratio {m['blocking_over_step']:.3f}; committed after "
            f"{m['committed_after_s_median']:.2f} s; steps during a write {m['step_s_after_save_median']}"
        )
    print(f"wrote {out}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

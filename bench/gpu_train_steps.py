"""A few training steps of the shipped FLUX LoRA config through the real trainer (`train.train`), on random
full-size weights: regional torch.compile, CUDA-graph sampler, bf16, LoRA, decode checkpointing as configured.

    python bench/gpu_train_steps.py                        # GPU: configs/flux_leapalign.toml at 512², 4 steps
    python bench/gpu_train_steps.py --model random-tiny --set model.compile='"none"'   # CPU smoke of the same path

Only the weights and prompt embeddings are random (no FLUX download on the GPU machine) and the reward is the
weight-free `colour` one (HPSv2.1's weights are not shipped). Writes JSON: per-step seconds (the first includes
compilation and graph capture), peak GPU memory, torch.compile's graph count, the run's own metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after site-packages: an installed leapalign_fast (with its kernels) wins

COLOUR_PROMPTS = ["a red square", "a green circle", "a blue triangle", "a yellow star"]


class StepFollower:
    """Hands each new line of the trainer's metrics.jsonl (one per optimizer step) to `emit` while the run goes on
    (a thread polling the file twice a second), and the rest when the run ends."""

    def __init__(self, path: Path, emit):
        import threading

        self.path, self.emit, self.seen, self.stop = path, emit, 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _drain(self) -> None:
        try:
            lines = self.path.read_text().split("\n")[:-1]  # complete lines only: the last may be being written
        except OSError:  # not written yet
            return
        for line in lines[self.seen :]:
            self.emit(json.loads(line))
            self.seen += 1

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            self._drain()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._drain()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "flux_leapalign.toml")
    p.add_argument("--model", choices=["flux-dev", "random-tiny"], default="flux-dev")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results (a temp dir for random-tiny)")
    p.add_argument(
        "--jsonl",
        type=Path,
        default=None,
        help="also append a row per finished step (the trainer's metrics) and the final result to this JSONL file "
        "as they come: a run stopped from outside keeps its finished steps",
    )
    p.add_argument("--dry-run", action="store_true", help="load the config, print the plan, exit")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from leapalign_fast.config import config_dict, load_config

    res = args.resolution if args.model == "flux-dev" else 64
    overrides = [
        f"resolution={res}",
        f"max_steps={args.steps}",
        f"batch_size={args.batch}",
        "checkpoint_every=100000",
        "grid_every=0",
        "resume=false",
        'prompt_file=""',
        'prompts=""',
        "report_to=none",
        'reward.name="colour"',
        "reward.options={}",
        f"eval_prompts={json.dumps(COLOUR_PROMPTS)}",
        *args.set,
    ]
    cfg = load_config(args.config, overrides)  # the method's full settings typed in, torch not imported
    if args.dry_run:
        print(
            f"plan: {args.model} random weights, {cfg.max_steps} steps at {cfg.resolution}², batch {cfg.batch_size}, "
            f"N={cfg.num_steps}, compile={cfg.model.compile}, cuda_graph={cfg.model.cuda_graph}, "
            f"lora={cfg.lora.enabled} r{cfg.lora.rank}, mixed_precision={cfg.mixed_precision}, "
            f"checkpoint_decode={cfg.model.checkpoint_decode}"
        )
        return 0
    import torch

    from bench.common import append_row, is_oom, slug, write_result
    from bench.random_models import random_weights
    from leapalign_fast import train

    cuda = torch.cuda.is_available()
    if args.model == "flux-dev" and not cuda:
        print(
            "bench/gpu_train_steps.py needs a CUDA GPU; --model random-tiny runs the same path on CPU", file=sys.stderr
        )
        return 2
    label = {
        "bench": "train_steps",
        "model": args.model,
        "compile": cfg.model.compile,
        "cuda_graph": cfg.model.cuda_graph,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg.output_dir = tmp
        t0 = time.perf_counter()
        follow = StepFollower(Path(tmp) / "metrics.jsonl", lambda m: append_row(args.jsonl, {**label, "step": m}))
        try:
            with random_weights(args.model, "cuda" if cuda else "cpu"), follow:
                result = train.train(cfg)
        except Exception as e:
            if not is_oom(e):
                raise
            append_row(args.jsonl, {**label, "oom": True, "error": str(e).splitlines()[0]})
            print(f"out of memory: {str(e).splitlines()[0]}", file=sys.stderr)
            return 3
        wall = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    try:
        from torch._dynamo.utils import counters

        graphs = int(counters["stats"]["unique_graphs"])
    except Exception:  # dynamo internals moved: the count is informative only
        graphs = None
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    payload = {
        "model": args.model,
        "steps": result.steps,
        "wall_seconds": wall,
        "step_seconds": [m["step_seconds"] for m in metrics],
        "rewards": result.rewards,
        "losses": [m["loss"] for m in metrics],
        "compiled_graphs": graphs,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "config": config_dict(cfg),
        "metrics": metrics,
        "note": "random weights and prompt embeddings, colour reward; the first step includes compilation",
    }
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="bench-train-")) if args.model == "random-tiny" else ROOT / "bench" / "results"
    )
    tag = "" if cfg.model.compile == "none" else f"_{slug(cfg.model.compile)}"  # eager keeps the old file name
    path = write_result(out / f"train_steps_{args.model}_{slug(gpu)}{tag}.json", payload)
    append_row(args.jsonl, {**label, **{k: v for k, v in payload.items() if k not in ("config", "metrics")}})
    print(
        f"{result.steps} steps, seconds per step {[round(s, 2) for s in payload['step_seconds']]}, peak "
        f"{payload['peak_gpu_mib'] or float('nan'):.0f} MiB, compiled graphs {graphs}; wrote {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

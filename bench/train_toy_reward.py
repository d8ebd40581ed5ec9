"""Train the toy benchmark's differentiable reward (leapalign_fast.toy.reward) on procedural scenes.

    python bench/train_toy_reward.py --steps 3000 --batch 32 --seed 0 --out assets/toy/reward.safetensors

Writes the weights (safetensors) and, beside them, a JSON with the command, seed, steps, final loss and the
pairwise accuracy (true caption above its one-attribute negative) on 1000 fresh scenes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from leapalign_fast.toy.reward import accuracy, save_toy_reward, train_toy_reward  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "toy" / "reward.safetensors")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = train_toy_reward(args.steps, args.batch, args.seed, args.lr, log=lambda m: print(m, flush=True))
    acc = accuracy(model, 1000, seed=10_000 + args.seed)
    save_toy_reward(model, args.out)
    write_result(args.out.with_suffix(".json"), {"steps": args.steps, "batch": args.batch, "seed": args.seed,
                 "lr": args.lr, "pairwise_accuracy": acc, "train_seconds": time.perf_counter() - t0})  # fmt: skip
    print(f"pairwise accuracy {acc:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

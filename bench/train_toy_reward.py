"""Train the toy benchmark's differentiable reward (leapalign_fast.toy.reward) on procedural scenes.

    python bench/train_toy_reward.py --seed 0 --threads 2     # writes assets/toy/reward_0.safetensors
    python bench/train_toy_reward.py --seed 1 --threads 2     # the second member of the shipped ensemble

Half the positives are drawn by the pretrained toy generator (`--bank-model`) from known scenes: each scene is
rendered, encoded by the generator's VAE, noised to a time t in `--bank-t` and denoised by the generator with its
caption (SDEdit). The images then carry the generator's own style (soft blobs, mixed colours) while t is low enough
that the scene's content, hence its caption, is kept. A scorer trained only on crisp renders rates the generator's
images out of distribution, and fine-tuning against it finds images it scores highly that show nothing.

Writes the weights (safetensors) and, beside them, a JSON with the command, seed, steps, final loss and the
pairwise accuracy (true caption above its one-attribute negative) on 1000 fresh scenes.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from leapalign_fast.models.backbone import DTYPES, family_of, get_backbone  # noqa: E402
from leapalign_fast.sampler import sample_trajectory  # noqa: E402
from leapalign_fast.toy.reward import accuracy, save_toy_reward, train_toy_reward  # noqa: E402
from leapalign_fast.toy.scenes import render, sample_scene  # noqa: E402


@torch.no_grad()
def generator_bank(model_dir: Path, n: int, t_range: tuple[float, float], steps: int, seed: int, log=print):
    """n (image, scene) pairs: scenes rendered, noised to t ~ U(t_range) in the generator's latent space and
    denoised by it with their captions in `steps` Euler steps."""
    backbone = get_backbone(family_of(str(model_dir), ""))
    comps = backbone.load(model_dir, DTYPES["float32"])
    geom = backbone.geometry(comps, 64)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    images, scenes = [], []
    for start in range(0, n, 64):
        batch = [sample_scene(rng) for _ in range(min(64, n - start))]
        x0 = backbone.encode_images(comps.vae, torch.from_numpy(np.stack([render(sc.objects) for sc in batch])))
        t = rng.uniform(*t_range)
        xt = (1 - t) * x0 + t * torch.randn(x0.shape, generator=gen)
        cond = backbone.encode_prompts(comps.text, [sc.caption for sc in batch])
        velocity = backbone.velocity(comps.transformer, cond, geom, 3.5)
        out = sample_trajectory(velocity, xt, torch.linspace(t, 0.0, steps + 1)).x0
        images.append(backbone.decode(comps.vae, out, geom).numpy())
        scenes += batch
        if start % 512 == 0:
            log(f"generator bank: {start + len(batch)}/{n}")
    return np.concatenate(images), scenes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--junk",
        type=float,
        default=0.3,
        help="fraction of negatives that are junk images or a scene missing one object",
    )
    p.add_argument(
        "--smooth", type=float, default=1.0, help="Gaussian blur (sigma, px) the scorer applies to its input"
    )
    p.add_argument(
        "--bank-model",
        type=Path,
        default=ROOT / "assets" / "toy" / "flux",
        help="the toy generator whose SDEdit images are half the positives ('' for renders only)",
    )
    p.add_argument("--bank", type=int, default=2048, help="generator images drawn once")
    p.add_argument("--bank-t", type=float, nargs=2, default=(0.15, 0.5))
    p.add_argument("--bank-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="default: assets/toy/reward_<seed>.safetensors")
    args = p.parse_args(argv)
    args.out = args.out or ROOT / "assets" / "toy" / f"reward_{args.seed}.safetensors"
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    log = lambda m: print(m, flush=True)  # noqa: E731
    bank = None
    if str(args.bank_model) not in ("", "."):
        bank = generator_bank(args.bank_model, args.bank, tuple(args.bank_t), args.bank_steps, args.seed + 1, log)
    model = train_toy_reward(args.steps, args.batch, args.seed, args.lr, args.junk, args.smooth, bank, log=log)
    acc = accuracy(model, 1000, seed=10_000 + args.seed)
    save_toy_reward(model, args.out)
    write_result(
        args.out.with_suffix(".json"),
        {
            "steps": args.steps,
            "batch": args.batch,
            "seed": args.seed,
            "lr": args.lr,
            "junk": args.junk,
            "smooth": args.smooth,
            "bank_model": str(args.bank_model),
            "bank": args.bank,
            "bank_t": list(args.bank_t),
            "bank_steps": args.bank_steps,
            "pairwise_accuracy": acc,
            "train_seconds": time.perf_counter() - t0,
        },
    )
    print(f"pairwise accuracy {acc:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

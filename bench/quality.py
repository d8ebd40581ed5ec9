"""Toy-scale alignment benchmark: every method from the same pretrained tiny FLUX, same reward, prompts and budget,
scored by the rule-based evaluator (never the training reward) per GenEval-style category, over seeds.

    python bench/quality.py                  # configs/tiny.toml's model, reward and settings; every method, 3 seeds
    python bench/quality.py --set lr=1e-4 method.lam=2.0 --steps 200   # any config override
    python bench/quality.py --quick          # 1 seed, few steps, few prompts: checks the pipeline (CI)

Every run starts from the config (`--config`, default configs/tiny.toml: the shipped toy FLUX and toy reward) and
differs only in method and seed. Budget: the same number of optimizer steps, batch size and sampling steps N for
every method (so the same number of sampled trajectories); the grad-enabled forwards per trajectory differ by
method, as in the paper.
Writes JSON, a markdown table (mean ± std over seeds) and reward curves under bench/results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from leapalign_fast import checkpoint as ckpt  # noqa: E402
from leapalign_fast.config import config_dict, load_config  # noqa: E402
from leapalign_fast.evaluate import sample_images  # noqa: E402
from leapalign_fast.methods import METHODS as REGISTRY  # noqa: E402
from leapalign_fast.toy.evaluator import evaluate_images  # noqa: E402
from leapalign_fast.toy.scenes import CATEGORIES, prompt_set  # noqa: E402
from leapalign_fast.train import train  # noqa: E402

METHODS = [m for m, spec in REGISTRY.items() if not spec.reference]  # every alignment method (not `full`)


def run_config(args, method: str, seed: int, out: Path, prompt_file: Path):
    overrides = [f"output_dir={out}", f"prompt_file={prompt_file}", f"seed={seed}", f"method.name={method}",
                 f"max_steps={args.steps}", "tensorboard=false", f"checkpoint_every={args.steps}", "keep_checkpoints=1",
                 "eval_prompts=['a red circle', 'a blue square and a green triangle']"]  # fmt: skip
    if args.model:
        overrides.append(f"model.source={args.model}")
    if args.reward:
        overrides.append(f"reward.options.path={args.reward}")
    return load_config(args.config, overrides + list(args.set))


def score(cfg, path, prompts, specs, args, seed) -> dict[str, float]:
    images = np.concatenate([im.cpu().numpy() for _, im in sample_images(cfg, prompts, path, num_steps=args.eval_n,
                                                                            batch_size=60, seed=1000 + seed)])  # fmt: skip
    return evaluate_images(images, specs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.toml")
    p.add_argument("--model", type=Path, default=None, help="model.source (default: the config's)")
    p.add_argument("--reward", type=Path, default=None, help="reward.options.path (default: the config's)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value for every run")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run, equal for every method "
                   "(default: the config's max_steps)")
    p.add_argument("--eval-n", type=int, default=20, help="evaluation sampling steps")
    p.add_argument("--eval-images", type=int, default=2, help="images per evaluation prompt (different noise)")
    p.add_argument("--train-prompts", type=int, default=40, help="per category")
    p.add_argument("--eval-prompts", type=int, default=30, help="per category")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_n, args.train_prompts, args.eval_prompts, args.eval_images = [0], 3, 4, 4, 2, 1
        args.set = ["num_steps=4", *args.set]
    args.steps = args.steps or load_config(args.config, list(args.set)).max_steps
    train_set = prompt_set(args.train_prompts, seed=0)
    # Drawn independently of the training prompts; the caption space is small (3 single-object captions in all),
    # so the two sets can overlap. Every evaluation image comes from fresh noise either way.
    eval_set = prompt_set(args.eval_prompts, seed=1)
    eval_prompts = [c for c, _ in eval_set for _ in range(args.eval_images)]
    eval_specs = [s for _, s in eval_set for _ in range(args.eval_images)]
    work = Path(tempfile.mkdtemp(prefix="quality-"))
    prompt_file = work / "train_prompts.txt"
    prompt_file.write_text("\n".join(c for c, _ in train_set) + "\n")
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {"base": []}
    curves: dict[str, list[list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    for seed in args.seeds:
        cfg = run_config(args, "leapalign", seed, work / "base", prompt_file)
        results["base"].append(score(cfg, None, eval_prompts, eval_specs, args, seed))
        for m in args.methods:
            out = work / f"{m}_{seed}"
            cfg = run_config(args, m, seed, out, prompt_file)
            t1 = time.perf_counter()
            res = train(cfg)
            seconds.setdefault(m, []).append(time.perf_counter() - t1)
            curves.setdefault(m, []).append(res.rewards)
            results.setdefault(m, []).append(score(cfg, ckpt.list_checkpoints(out)[-1], eval_prompts, eval_specs, args, seed))
            print(f"{m} seed {seed}: overall {results[m][-1]['overall']:.3f} (base {results['base'][-1]['overall']:.3f}), "
                  f"reward {np.mean(res.rewards[:10]):.3f} -> {np.mean(res.rewards[-10:]):.3f}", flush=True)  # fmt: skip
    cats = list(CATEGORIES) + ["overall"]
    table = {m: {c: [float(np.mean([r[c] for r in rs])), float(np.std([r[c] for r in rs]))] for c in cats}
             for m, rs in results.items()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "quality_toy_quick" if args.quick else "quality_toy"
    md = ["| method | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for m, row in table.items():
        md.append(f"| {m} | " + " | ".join(f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in cats) + " |")
    (args.out / f"{name}.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, runs in curves.items():
        length = min(len(r) for r in runs)
        ax.plot(np.mean([r[:length] for r in runs], axis=0), label=m)
    ax.set(xlabel="optimizer step", ylabel="training reward (mean over seeds)", title="toy reward during fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{name}_reward_curves.png", dpi=100)
    write_result(args.out / f"{name}.json", {"table": table, "per_seed": results, "curves": curves,
                 "settings": {k: str(v) for k, v in vars(args).items()}, "config": config_dict(cfg),
                 "wall_seconds": time.perf_counter() - t0, "seconds_per_method": seconds,
                 "budget": "equal optimizer steps, batch size and sampling steps per method"})  # fmt: skip
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

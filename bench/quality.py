"""Toy-scale alignment benchmark: every method in the registry fine-tunes the same pretrained tiny FLUX towards the
same reward on the *training* captions; the rule-based evaluator (never a training signal) scores held-out captions.

    python bench/quality.py --split validation          # tuning: every choice (lr, steps, margin, ...) is made here
    python bench/quality.py --split test --seeds 100 101 102 103 104 105 106 107 --jobs 2   # the final table, once
    python bench/quality.py --set lr=3e-5 --steps 200    # any config override, for every method
    python bench/quality.py --quick                      # 1 seed, few steps and images: checks the pipeline (CI)

Protocol (leapalign_fast/toy/splits.py): training captions, validation captions and test captions are disjoint
with a compositional hold-out (no colour-shape, count-object or object-relation-object combination of a held-out
caption is trained). Evaluation: `--images` images per category (equal weight per category; each caption of the
split in a fixed order, cycled), sampled with `--eval-n` steps from noise seeded by the seed, so the base model and
every method of one seed see the same evaluation noise, and every method of one seed the same training noise
(prompt order and step draws follow the seed). Statistics over seeds: mean with a 95% t interval; paired
differences (same seed) against the base and between methods, with paired t and two-sided p; the base model's own
seed-to-seed std (evaluation noise only).

Budget: the same optimizer steps, batch and sampling steps N for every method; wall time and grad-enabled
transformer forwards per step are measured per method. `--eval-every K` turns on the trainer's validation
(eval_every: the evaluator and the reward on validation captions) for the curves of validation evaluator against
wall-clock time; `--select best` then scores each run's `best` checkpoint (chosen on validation) instead of its last.

Writes bench/results/quality_toy_<split>.{json,md} (+ reward curves, validation curves, sample grids).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from bench.stats import mean_ci, paired  # noqa: E402
from leapalign_fast.methods import METHODS as REGISTRY  # noqa: E402
from leapalign_fast.toy.scenes import CATEGORIES  # noqa: E402
from leapalign_fast.toy.splits import evaluation_set  # noqa: E402

METHODS = [m for m, spec in REGISTRY.items() if not spec.reference]  # every alignment method (not `full`)
STRICT = [f"strict/{c}" for c in CATEGORIES]
IMAGE_COLUMNS = ["strict", "objects", "extra", "empty", "specks", "artefact"]  # toy.evaluator.summarise
COLUMNS = [*CATEGORIES, "overall", "heldout", "reward", "ood_reward", "colour_entropy", "diversity"]
DIFF_COLUMNS = ("overall", "heldout", "reward", "ood_reward", "colour_entropy", "diversity")
STRICT_DIFF = ("overall", "strict", "objects", "empty", "artefact")  # Δ vs base in the strict table
TRAIN_PROMPTS = ROOT / "assets" / "toy" / "prompts_train.txt"


def run_config(args, method: str, seed: int, out: Path, extra=()):
    from leapalign_fast.config import load_config

    overrides = [
        f"output_dir={out}",
        f"prompt_file={TRAIN_PROMPTS}",
        f"seed={seed}",
        f"method.name={method}",
        f"max_steps={args.steps}",
        "report_to=none",
        f"checkpoint_every={args.steps}",
        "keep_checkpoints=1",
        "eval_prompts=['a red square', 'a blue circle and a yellow triangle']",
    ]
    if args.model:
        overrides.append(f"model.source={args.model}")
    if args.reward:
        overrides.append(f"reward.options.path={args.reward}")

    per_method = per_method_overrides(args.per_method or []).get(method, [])
    return load_config(args.config, overrides + list(args.set) + per_method + list(extra))


def per_method_overrides(paths) -> dict[str, list[str]]:
    """The "overrides" of one or more tuning results (bench/tune_toy.py), merged: grids tuned apart (other methods,
    same protocol) make one test table. A method two files set differently is an error, not a silent pick."""
    merged: dict[str, list[str]] = {}
    for path in paths:
        for method, keys in json.loads(Path(path).read_text())["overrides"].items():
            if method in merged and merged[method] != keys:
                raise SystemExit(f"--per-method: {path} sets {method} to {keys}, an earlier file to {merged[method]}")
            merged[method] = keys
    return merged


def load_runs(paths) -> list[dict]:
    """The runs of one or more runs.jsonl files (a benchmark cut short and its rest, other methods on the same seeds).
    A (method, seed) run found twice must be the same run: its table identical (runs are deterministic at one thread),
    else the files come from different settings and cannot be pooled."""
    runs: dict[tuple, tuple[dict, Path]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            r["task"] = tuple(r["task"])
            if r["task"] in runs:
                first, where = runs[r["task"]]
                if json.dumps(first["table"], sort_keys=True) != json.dumps(r["table"], sort_keys=True):
                    raise SystemExit(
                        f"--from-runs: {r['task'][0]} seed {r['task'][1]} differs between {where} and {path}: "
                        "these runs were not made with the same settings; pool only runs of one command"
                    )
                continue
            runs[r["task"]] = (r, Path(path))
    return [r for r, _ in runs.values()]


def score(cfg, path, eval_set, args, seed, reward, ood) -> tuple[dict, np.ndarray]:
    """Evaluator accuracies per category, `overall` (mean of the six), `heldout` (without `single`, whose captions
        are trained), the trained reward's mean (in-domain), the out-of-domain scorer's mean (`ood_reward`: another
        architecture, data and seed, never a training signal), `colour_entropy` (evaluator.colour_entropy: collapse of
        the colours of colour-free captions) and `diversity` (RMS pixel distance between images of one caption from
        different noise, averaged over captions); and the strict evaluator's columns (toy.evaluator.summarise: `strict`
    and `strict/<category>`, `objects`, `extra`, `empty`, `specks`, `artefact`): (table, images)."""
    import torch

    from leapalign_fast.evaluate import sample_images
    from leapalign_fast.toy.evaluator import colour_entropy, evaluate_strict

    prompts, specs = [c for c, _ in eval_set], [s for _, s in eval_set]
    images = np.concatenate(
        [
            im.cpu().numpy()
            for _, im in sample_images(cfg, prompts, path, num_steps=args.eval_n, batch_size=96, seed=1000 + seed)
        ]
    )
    table = evaluate_strict(images, specs)
    table["heldout"] = float(np.mean([table[c] for c in CATEGORIES if c != "single"]))
    with torch.no_grad():
        table["reward"] = float(
            torch.cat(
                [reward(torch.from_numpy(images[i : i + 96]), prompts[i : i + 96]) for i in range(0, len(prompts), 96)]
            ).mean()
        )
        table["ood_reward"] = (
            float(
                torch.cat(
                    [ood(torch.from_numpy(images[i : i + 96]), prompts[i : i + 96]) for i in range(0, len(prompts), 96)]
                ).mean()
            )
            if ood
            else float("nan")
        )
    table["colour_entropy"] = colour_entropy(images, specs)
    by_caption: dict[str, list[np.ndarray]] = {}
    for p, im in zip(prompts, images):
        by_caption.setdefault(p, []).append(im)
    dists = [
        np.sqrt(np.mean((a - b) ** 2))
        for ims in by_caption.values()
        if len(ims) > 1
        for i, a in enumerate(ims)
        for b in ims[i + 1 :]
    ]
    table["diversity"] = float(np.mean(dists)) if dists else float("nan")
    return table, images


class ForwardCounter:
    """Counts transformer forwards (one per batched call), with and without grad, via a global module hook."""

    def __init__(self):
        import torch
        from diffusers import FluxTransformer2DModel

        self.grad = self.nograd = 0

        def hook(module, inputs, output):
            if isinstance(module, FluxTransformer2DModel):
                if torch.is_grad_enabled():
                    self.grad += 1
                else:
                    self.nograd += 1

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)

    def close(self):
        self.handle.remove()


def grid_images(images: np.ndarray, args) -> list:
    """`args.grid` images spread over the categories (the evaluation set is category-major), for the sample grids."""
    per = max(1, -(-args.grid // len(CATEGORIES)))
    pick = [c * args.images + j for j in range(min(per, args.images)) for c in range(len(CATEGORIES))][: args.grid]
    return images[sorted(pick)].tolist()


def run_task(args, task: tuple[str, int], work: Path) -> dict:
    """One (method or "base", seed): train (not for base), then score. Runs in a worker process with --jobs > 1."""
    import torch

    torch.set_num_threads(args.threads)
    from leapalign_fast import checkpoint as ckpt
    from leapalign_fast.rewards import build_reward
    from leapalign_fast.train import train

    method, seed = task
    eval_set = evaluation_set(args.split, args.images, seed=0)
    ood = build_reward("toy", path=[str(p) for p in args.ood_reward], combine="mean") if args.ood_reward else None
    out = work / f"{method}_{seed}"
    if method == "base":
        cfg = run_config(args, "leapalign", seed, out)
        reward = build_reward(cfg.reward.name, **cfg.reward.options)
        table, images = score(cfg, None, eval_set, args, seed, reward, ood)
        return {"task": task, "table": table, "images": grid_images(images, args)}
    extra = []
    if args.eval_every:
        extra = [
            f"eval_every={args.eval_every}",
            f"eval_prompt_file={work / 'validation_prompts.txt'}",
            "eval_rewards=['evaluator', 'reward']",
            f"best_metric='{args.best_metric}'",
            f"eval_num_steps={args.eval_n}",
        ]
    cfg = run_config(args, method, seed, out, extra)
    counter = ForwardCounter()
    t0 = time.perf_counter()
    try:
        res = train(cfg)
    finally:
        counter.close()
    seconds = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    validation = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()] if args.eval_every else []
    clock = np.cumsum([m["step_seconds"] for m in metrics]).tolist()
    path = out / "best" if args.select == "best" else ckpt.list_checkpoints(out)[-1]
    reward = res.trainer.reward
    table, images = score(cfg, path, eval_set, args, seed, reward, ood)
    return {
        "task": task,
        "table": table,
        "images": grid_images(images, args),
        "rewards": res.rewards,
        "train_seconds": seconds,
        "steps": res.steps,
        "step_seconds": float(np.mean([m["step_seconds"] for m in metrics])),
        "grad_forwards_per_step": counter.grad / res.steps,
        "validation": [{**r, "train_seconds": clock[r["step"] - 1] if r["step"] else 0.0} for r in validation],
    }


def _worker(payload):
    args, task, work = payload
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return run_task(args, task, work)


def summarise(results: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
    """Per method: mean and 95% CI of every column; paired differences against base and between methods (of the
    GenEval-style `overall` in `between`, of the strict score in `between_strict`). Runs recorded before the strict
    evaluator existed (no `strict` column) give the GenEval-style tables only."""
    strict = all("strict" in r["table"] for runs in results.values() for r in runs.values())
    columns = COLUMNS + (STRICT + IMAGE_COLUMNS if strict else [])
    diffs = list(DIFF_COLUMNS) + ([c for c in IMAGE_COLUMNS if c not in DIFF_COLUMNS] if strict else [])
    table = {m: {c: mean_ci([runs[s]["table"][c] for s in seeds]) for c in columns} for m, runs in results.items()}
    vs_base = {
        m: {
            c: paired([runs[s]["table"][c] for s in seeds], [results["base"][s]["table"][c] for s in seeds])
            for c in diffs
        }
        for m, runs in results.items()
        if m != "base"
    }
    methods = [m for m in results if m != "base"]

    def between(col):
        return {
            a: {
                b: paired([results[a][s]["table"][col] for s in seeds], [results[b][s]["table"][col] for s in seeds])
                for b in methods
                if b != a
            }
            for a in methods
        }

    out = {"table": table, "vs_base": vs_base, "between": between("overall")}
    if strict:
        out["between_strict"] = between("strict")
    return out


def markdown(summary: dict, results: dict, args) -> str:
    t, vb = summary["table"], summary["vs_base"]
    order = ["base"] + sorted((m for m in t if m != "base"), key=lambda m: -t[m]["overall"]["mean"])
    fmt = lambda s: f"{s['mean']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"  # noqa: E731
    md = [
        f"Split `{args.split}`, seeds {args.seeds} (n = {len(args.seeds)}), {args.images} images per category; "
        "mean [95% t interval] over seeds.",
        "",
        "| method | " + " | ".join(COLUMNS) + " | s/step | grad fwd/step |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for m in order:
        runs = list(results[m].values())
        speed = (
            f"{np.mean([r['step_seconds'] for r in runs]):.2f} | "
            f"{np.mean([r['grad_forwards_per_step'] for r in runs]):.2f}"
            if m != "base"
            else "– | –"
        )
        md.append(f"| {m} | " + " | ".join(fmt(t[m][c]) for c in COLUMNS) + f" | {speed} |")
    md += [
        "",
        "Paired differences against base (same seeds: same evaluation noise): mean [95% CI], paired t, p, "
        "seeds above base.",
        "",
        "| method | Δ overall | t | p | wins | Δ heldout | t | Δ reward | t | Δ ood_reward | t | "
        "Δ colour_entropy | t | Δ diversity |",
        "|---" * 14 + "|",
    ]
    for m in order[1:]:
        o, h, r, q, e, d = (vb[m][c] for c in DIFF_COLUMNS)
        md.append(
            f"| {m} | {o['diff']:+.3f} [{o['ci'][0]:+.3f}, {o['ci'][1]:+.3f}] | {o['t']:.2f} | {o['p']:.3f} | "
            f"{o['wins']}/{o['n']} | {h['diff']:+.3f} | {h['t']:.2f} | {r['diff']:+.2f} | {r['t']:.2f} | "
            f"{q['diff']:+.2f} | {q['t']:.2f} | {e['diff']:+.3f} | {e['t']:.2f} | {d['diff']:+.4f} |"
        )
    methods = order[1:]
    if "strict" in t["base"]:
        md += strict_markdown(summary, order, fmt)
    for key, what in (("between", "Δ overall (GenEval-style)"), ("between_strict", "Δ strict")):
        if len(methods) > 1 and key in summary:
            md += [
                "",
                f"Paired t of {what} between methods (row minus column):",
                "",
                "| | " + " | ".join(methods) + " |",
                "|---" * (len(methods) + 1) + "|",
            ]
            for a in methods:
                md.append(
                    f"| {a} | "
                    + " | ".join("–" if a == b else f"{summary[key][a][b]['t']:+.1f}" for b in methods)
                    + " |"
                )
    base_std = t["base"]["overall"]["std"]
    md += ["", f"Base model's own seed-to-seed std of overall (evaluation noise only): {base_std:.4f}."]
    return "\n".join(md) + "\n"


def strict_markdown(summary: dict, order: list[str], fmt) -> list[str]:
    """The strict evaluator's tables: per category, the image counts, and Δ vs base next to the GenEval-style Δ."""
    t, vb = summary["table"], summary["vs_base"]
    md = [
        "",
        "Strict score (a pass only with exactly the caption's objects and no artefact; toy/evaluator.py) per "
        "category, mean [95% t interval] over seeds:",
        "",
        "| method | " + " | ".join(CATEGORIES) + " | strict |",
        "|---" * (len(CATEGORIES) + 2) + "|",
    ]
    for m in order:
        md.append(f"| {m} | " + " | ".join(fmt(t[m][c]) for c in [*STRICT, "strict"]) + " |")
    md += [
        "",
        "What the images hold: objects detected per image, objects beyond the caption's per image, empty images, "
        "specks per image, images with an artefact (more specks than toy.evaluator.MAX_SPECKS):",
        "",
        "| method | objects | extra | empty | specks | artefact |",
        "|---" * 6 + "|",
    ]
    for m in order:
        md.append(
            f"| {m} | " + " | ".join(fmt(t[m][c]) for c in ["objects", "extra", "empty", "specks", "artefact"]) + " |"
        )
    md += [
        "",
        "Paired differences against base, GenEval-style and strict: mean [95% CI] (paired t, seeds above base).",
        "",
        "| method | " + " | ".join(f"Δ {c}" for c in STRICT_DIFF) + " |",
        "|---" * (len(STRICT_DIFF) + 1) + "|",
    ]
    for m in order[1:]:
        md.append(
            f"| {m} | "
            + " | ".join(
                f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (t {d['t']:.2f}, {d['wins']}/{d['n']})"
                for d in (vb[m][c] for c in STRICT_DIFF)
            )
            + " |"
        )
    return md


def plots(results: dict, out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, runs in results.items():
        if m == "base":
            continue
        curves = [r["rewards"] for r in runs.values()]
        length = min(len(c) for c in curves)
        ax.plot(np.mean([c[:length] for c in curves], axis=0), label=m)
    ax.set(xlabel="optimizer step", ylabel="training reward (mean over seeds)", title="toy reward during fine-tuning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_reward_curves.png", dpi=100)
    plt.close(fig)
    if any(r.get("validation") for runs in results.values() for r in runs.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, runs in results.items():
            vals = [r["validation"] for r in runs.values() if r.get("validation")]
            if vals:
                length = min(len(v) for v in vals)
                ax.plot(
                    np.mean([[row["train_seconds"] for row in v[:length]] for v in vals], axis=0),
                    np.mean([[row["val/evaluator"] for row in v[:length]] for v in vals], axis=0),
                    marker=".",
                    label=m,
                )
        ax.set(xlabel="training wall-clock (s, excluding validation)", ylabel="validation evaluator (mean over seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{name}_validation_vs_time.png", dpi=100)
        plt.close(fig)


def save_grids(results: dict, seed: int, out: Path, name: str) -> None:
    import torch

    from leapalign_fast.images import save_grid

    for m, runs in results.items():
        images = torch.tensor(runs[seed]["images"])
        if len(images):
            save_grid(images, out / f"{name}_samples" / f"{m}.png", columns=min(6, len(images)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.toml")
    p.add_argument("--model", type=Path, default=None, help="model.source (default: the config's)")
    p.add_argument("--reward", type=Path, default=None, help="reward.options.path (default: the config's)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value for every run")
    p.add_argument(
        "--per-method",
        type=Path,
        nargs="+",
        default=None,
        help='JSON {"overrides": {method: [key=value, ...]}} '
        "(bench/tune_toy.py's choice on validation), applied after --set; several files merge (disjoint methods)",
    )
    p.add_argument(
        "--ood-reward",
        type=Path,
        nargs="*",
        default=[ROOT / "assets" / "toy" / "reward_0.safetensors", ROOT / "assets" / "toy" / "reward_1.safetensors"],
        help="out-of-domain scorer(s) (mean), reported as ood_reward, never trained on",
    )
    p.add_argument("--name", default=None, help="output name (default: quality_toy_<split>)")
    p.add_argument("--methods", nargs="*", default=METHODS, help="methods to train (none: the base model only)")
    p.add_argument(
        "--split",
        choices=("validation", "test", "train"),
        default="validation",
        help="evaluation captions: validation for every choice, test once for the final table; train "
        "(the fine-tuning captions, new noise) only to diagnose in-domain against held-out gains",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per run, equal for every method (default: the config's max_steps)",
    )
    p.add_argument("--eval-n", type=int, default=20, help="evaluation sampling steps")
    p.add_argument("--images", type=int, default=48, help="evaluation images per category")
    p.add_argument("--eval-every", type=int, default=0, help="trainer validation every K steps (curves; --select best)")
    p.add_argument("--select", choices=("last", "best"), default="last", help="checkpoint scored per run")
    p.add_argument(
        "--best-metric",
        default="evaluator",
        help="validation score that picks `best` (--select best): evaluator (GenEval-style) or evaluator/strict, ...",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--grid", type=int, default=12, help="sample images kept per method (first seed)")
    p.add_argument(
        "--from-runs",
        type=Path,
        nargs="+",
        default=None,
        help="summarise the runs.jsonl of earlier (maybe cut short) benchmarks: the seeds all listed methods finished; "
        "several files pool (a run found twice must be identical)",
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.select == "best" and not args.eval_every:
        p.error("--select best needs --eval-every K (the best checkpoint is chosen by the trainer's validation)")
    from leapalign_fast.config import config_dict, load_config

    if args.quick:
        args.seeds, args.steps, args.eval_n, args.images, args.grid = args.seeds[:1], 3, 4, 2, 4
        args.set = ["num_steps=4", *args.set]
    args.steps = args.steps or load_config(args.config, list(args.set)).max_steps
    work = Path(tempfile.mkdtemp(prefix="quality-"))
    (work / "validation_prompts.txt").write_text(
        "".join(c + "\n" for c, _ in evaluation_set("validation", max(2, args.images // 4), seed=1))
    )
    tasks = [(m, s) for s in args.seeds for m in ["base", *args.methods]]  # seed-major: a cut run has whole seeds
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict]] = {}

    name = (args.name or f"quality_toy_{args.split}") + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"{name}_runs.jsonl"  # every finished run as it comes: a cut-short benchmark keeps its runs
    if not args.from_runs:
        partial.unlink(missing_ok=True)

    def record(r):
        (m, s) = r["task"]
        results.setdefault(m, {})[s] = r
        with open(partial, "a") as f:
            f.write(json.dumps({k: v for k, v in r.items() if k != "images"}) + "\n")
        base = results.get("base", {}).get(s)
        note = f" (base {base['table']['overall']:.3f})" if base and m != "base" else ""
        print(
            f"{m} seed {s}: overall {r['table']['overall']:.3f}{note}, reward {r['table']['reward']:.2f} "
            f"[{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )

    if args.from_runs:
        runs = load_runs(args.from_runs)
        args.methods = [m for m in args.methods if any(r["task"][0] == m for r in runs)]
        done = [s for s in args.seeds if all(any(r["task"] == (m, s) for r in runs) for m in ["base", *args.methods])]
        args.seeds, name = done, name + "_from_runs"
        for r in runs:
            if r["task"][1] in done and r["task"][0] in ["base", *args.methods]:
                results.setdefault(r["task"][0], {})[r["task"][1]] = {**r, "images": []}
    elif args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for r in pool.map(_worker, [(args, t, work) for t in tasks]):
                record(r)
    else:
        for t in tasks:
            record(run_task(args, t, work))
    results = {m: results[m] for m in ["base", *args.methods]}
    summary = summarise(results, args.seeds)
    md = markdown(summary, results, args)
    (args.out / f"{name}.md").write_text(md)
    plots(results, args.out, name)
    save_grids(results, args.seeds[0], args.out, name)
    wall = time.perf_counter() - t0
    per_seed = {
        m: {s: {k: v for k, v in r.items() if k != "images"} for s, r in runs.items()} for m, runs in results.items()
    }
    write_result(
        args.out / f"{name}.json",
        {
            **summary,
            "per_seed": per_seed,
            "wall_seconds": wall,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "config": config_dict(run_config(args, "leapalign", args.seeds[0], work / "x")),
            "budget": "equal optimizer steps, batch size and sampling steps per method",
        },
    )
    print(md)
    print(f"wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

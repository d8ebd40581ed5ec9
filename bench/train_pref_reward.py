"""Train a toy reward the way HPS was built: from preferences over the generator's own samples.

    python bench/train_pref_reward.py --seed 0 --threads 1      # writes assets/toy/reward_pref.safetensors (+ .json)

1. The toy generator (`--model`) samples every *training* caption from `--per-caption` noises (half with N = 10
   sampling steps, the fine-tuning setting, half with N = 20, the evaluation setting).
2. The rule-based evaluator plays the annotator, on training captions only: `evaluator.graded` scores each image
   against its own caption and against `--relabel` other training captions (a one-attribute near miss that is a
   training caption, and a random training caption). `--annotator strict` grades as the strict score judges
   (`graded(..., strict=True)`: the strict pass, and extra objects and specks cost credit); `geneval` (the default,
   the shipped reward_pref's) as the GenEval-style pass.
   `--edits K` adds K edited copies of every training sample (one of its objects copied to an empty place, or
   painted over with the background), graded the same way: pairs one object apart, which sampled pairs rarely are.
3. Preference pairs: two images of one caption (HPS's pairs), or one image under two training captions, whose
   graded scores differ by at least `--margin`; the preferred one is the higher. A `ToyReward` scorer is trained
   with the Bradley-Terry loss -log sigmoid(r_win - r_lose).
4. Agreement with the evaluator on *held-out* generated pairs: fresh samples of the *validation* captions
   (`--val-per-caption` noises each, N = 20), never used for training: pairwise accuracy on pairs of one caption
   whose graded scores differ, and the same-caption AUC of pass vs fail (`judge`, or the strict pass with
   `--annotator strict`), each with a 95% interval from a bootstrap over captions (pairs of one caption are not
   independent); the same numbers for every `--compare` scorer (e.g. the procedural-scene rewards) on the same
   pairs.

Writes the weights (safetensors) and a JSON beside them with the command, seed, data sizes and the agreement.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from leapalign_fast.toy.evaluator import assess, graded  # noqa: E402
from leapalign_fast.toy.reward import ToyReward, perturb, save_toy_reward  # noqa: E402
from leapalign_fast.toy.scenes import caption  # noqa: E402
from leapalign_fast.toy.splits import split_specs  # noqa: E402


def generate(
    model: Path, captions: list[str], per_caption: int, steps: list[int], seed: int
) -> tuple[np.ndarray, list[str]]:
    """(n, 3, 64, 64) images of every caption from `per_caption` noises, split evenly over the sampling steps."""
    from leapalign_fast.config import load_config
    from leapalign_fast.evaluate import sample_images

    cfg = load_config(ROOT / "configs" / "tiny.toml", [f"model.source={model}", "report_to=none"])
    images, prompts = [], []
    for i, n in enumerate(steps):
        k = per_caption // len(steps) + (i < per_caption % len(steps))
        batch = [c for c in captions for _ in range(k)]
        images += [im.numpy() for _, im in sample_images(cfg, batch, None, num_steps=n, batch_size=96, seed=seed + i)]
        prompts += batch
    return np.concatenate(images).astype(np.float32), prompts


def cached_generate(
    cache: Path | None, what: str, model: Path, captions: list[str], per_caption: int, steps: list[int], seed: int
) -> tuple[np.ndarray, list[str]]:
    """`generate`, or its images read back from `cache` (safetensors, with the arguments that made them in its
    metadata): reward variants trained on the same samples skip the sampling, which is most of the time. A cache
    made with other arguments is an error, never silently reused."""
    if cache is None:
        return generate(model, captions, per_caption, steps, seed)
    import json

    from safetensors import safe_open

    from leapalign_fast.io import save_tensors_atomic

    path = cache.with_name(f"{cache.stem}_{what}.safetensors")
    made = {"model": str(Path(model).resolve()), "per_caption": per_caption, "steps": steps, "seed": seed}
    made["captions"] = captions
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            if json.loads(meta["made"]) != made:
                raise SystemExit(f"{path} holds samples made with other arguments; remove it or pass another --samples")
            return f.get_tensor("images").numpy(), json.loads(meta["prompts"])
    images, prompts = generate(model, captions, per_caption, steps, seed)
    meta = {"made": json.dumps(made), "prompts": json.dumps(prompts)}
    save_tensors_atomic({"images": torch.from_numpy(images)}, path, metadata=meta)
    return images, prompts


def edit_object(img: np.ndarray, rng: random.Random, add: bool) -> np.ndarray | None:
    """The same (3, H, W) image with one of its detected objects copied to an empty place (`add`), or painted over
    with the background (not `add`); None when there is no object, or no empty place for the copy. The copy brings
    the object's soft edge (up to SPECK_MARGIN px) and blends by its brightness, so the generator's own rendering of
    a shape is what the annotator sees twice; the pair (image, edited image) differs in one object only."""
    from leapalign_fast.toy.evaluator import FOREGROUND, SPECK_LEVEL, SPECK_MARGIN, _dilate, object_components

    comps = object_components(img)
    if not comps:
        return None
    pix = comps[rng.randrange(len(comps))]
    mask = np.zeros(img.shape[1:], dtype=bool)
    mask[pix[:, 0], pix[:, 1]] = True
    mask = _dilate(mask, SPECK_MARGIN)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    out = img.copy()
    ink = _dilate(img.max(0) >= SPECK_LEVEL, SPECK_MARGIN)  # every mark and its margin: not empty
    if not add:
        background = np.median(img[:, ~ink], axis=1) if (~ink).any() else np.zeros(img.shape[0], img.dtype)
        out[:, mask] = background[:, None]
        return out
    h, w = y1 - y0, x1 - x0
    H, W = mask.shape
    alpha = np.clip(img[:, y0:y1, x0:x1].max(0) / FOREGROUND, 0.0, 1.0) * mask[y0:y1, x0:x1]
    for _ in range(50):
        ty, tx = rng.randrange(0, H - h + 1), rng.randrange(0, W - w + 1)
        if not ink[ty : ty + h, tx : tx + w].any():
            region = out[:, ty : ty + h, tx : tx + w]
            out[:, ty : ty + h, tx : tx + w] = alpha * img[:, y0:y1, x0:x1] + (1 - alpha) * region
            return out
    return None


def edited_copies(images: np.ndarray, prompts: list[str], k: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Up to k edited copies of each image (`edit_object`, adding and removing an object in turn), with their
    captions: counterfactuals one object apart that the annotator grades like any sample, so the scorer sees pairs
    that differ only in how many objects there are (a sampled pair differs in everything)."""
    rng = random.Random(seed)
    out, caps = [], []
    for im, p in zip(images, prompts):
        for j in range(k):
            e = edit_object(im, rng, add=j % 2 == 0)
            if e is not None:
                out.append(e)
                caps.append(p)
    return (np.stack(out).astype(np.float32) if out else images[:0]), caps


def annotate(
    images: np.ndarray, prompts: list[str], specs: dict, relabel: int, rng: random.Random, strict: bool = False
):
    """(image index, caption, graded score) rows: each image under its own caption and `relabel` other training
    captions (a near miss when one is a training caption, else a random one)."""
    pool = list(specs)
    rows = []
    for i, (im, p) in enumerate(zip(images, prompts)):
        rows.append((i, p, graded(im, specs[p], strict)))
        for _ in range(relabel):
            miss = caption(perturb(specs[p], rng))
            other = miss if miss in specs and miss != p else rng.choice(pool)
            rows.append((i, other, graded(im, specs[other], strict)))
    return rows


def preference_pairs(rows, margin: float) -> list[tuple[tuple[int, str], tuple[int, str]]]:
    """((image, caption) preferred, (image, caption) other): same caption two images, or same image two captions."""
    by_caption: dict[str, list] = {}
    by_image: dict[int, list] = {}
    for i, p, s in rows:
        by_caption.setdefault(p, []).append((i, s))
        by_image.setdefault(i, []).append((p, s))
    pairs = []
    for p, items in by_caption.items():
        for a in range(len(items)):
            for b in range(a + 1, len(items)):
                (i, si), (j, sj) = items[a], items[b]
                if abs(si - sj) >= margin:
                    pairs.append(((i, p), (j, p)) if si > sj else ((j, p), (i, p)))
    n_caption = len(pairs)
    for i, items in by_image.items():
        for a in range(len(items)):
            for b in range(a + 1, len(items)):
                (p, sp), (q, sq) = items[a], items[b]
                if p != q and abs(sp - sq) >= margin:
                    pairs.append(((i, p), (i, q)) if sp > sq else ((i, q), (i, p)))
    return pairs, n_caption


def train_bt(
    images: np.ndarray,
    pairs,
    steps: int,
    batch: int,
    lr: float,
    dim: int,
    smooth: float,
    seed: int,
    log=print,
    groups: list[str] | None = None,
) -> ToyReward:
    """Bradley-Terry: minimise -log sigmoid(r(win) - r(lose)) over random batches of pairs. `groups` (one label per
    pair, e.g. the caption's category): each pair of a batch is drawn from a uniformly chosen group, so a group with
    many pairs (position captions have most) does not drown the others; None: pairs drawn uniformly."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if groups is not None:
        by_group: dict[str, list] = {}
        for pair, g in zip(pairs, groups):
            by_group.setdefault(g, []).append(pair)
        pools = [by_group[g] for g in sorted(by_group)]
    model = ToyReward(dim=dim, smooth=smooth)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + np.cos(np.pi * s / steps))
    )
    x = torch.from_numpy(images)
    losses = []
    for step in range(steps):
        if groups is None:
            pick = [pairs[rng.randrange(len(pairs))] for _ in range(batch)]
        else:
            pick = [(pool := pools[rng.randrange(len(pools))])[rng.randrange(len(pool))] for _ in range(batch)]
        idx = [w[0] for w, _ in pick] + [l[0] for _, l in pick]
        caps = [w[1] for w, _ in pick] + [l[1] for _, l in pick]
        r = model.logits(x[idx], caps)
        loss = -F.logsigmoid(r[:batch] - r[batch:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"preference reward step {step}: BT loss {np.mean(losses[-50:]):.4f}")
    return model.eval()


@torch.no_grad()
def scores_of(scorer, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    return torch.cat(
        [
            scorer(torch.from_numpy(images[i : i + 128]), prompts[i : i + 128]).float()
            for i in range(0, len(prompts), 128)
        ]
    ).numpy()


def agreement(r: np.ndarray, prompts: list[str], g: np.ndarray, passed: np.ndarray, boot: int = 1000) -> dict:
    """Pairwise agreement of scores `r` with the evaluator over pairs of images of one caption: on pairs whose graded
    scores differ (`pairwise_accuracy`), and pass vs fail (`auc`: the same-caption AUC; ties count half); each with
    a 95% interval (`*_ci`) from `boot` bootstrap resamples of the captions (a caption's pairs share its images)."""
    by: dict[str, list[int]] = {}
    for k, p in enumerate(prompts):
        by.setdefault(p, []).append(k)
    per = []  # per caption: (sum, count) of agreeing graded pairs, (sum, count) of agreeing pass-fail pairs
    for ks in by.values():
        acc, auc = [], []
        for a in ks:
            for b in ks:
                if g[a] > g[b]:
                    acc.append(float(r[a] > r[b]) + 0.5 * float(r[a] == r[b]))
                if passed[a] and not passed[b]:
                    auc.append(float(r[a] > r[b]) + 0.5 * float(r[a] == r[b]))
        per.append((sum(acc), len(acc), sum(auc), len(auc)))
    tot = np.asarray(per, dtype=np.float64).reshape(-1, 4)
    ratio = lambda t, i: float(t[i] / t[i + 1]) if t[i + 1] else float("nan")  # noqa: E731
    whole = tot.sum(0)
    rng = np.random.default_rng(0)
    draws = np.stack([tot[rng.integers(0, len(tot), len(tot))].sum(0) for _ in range(boot)]) if len(tot) else None

    def ci(i):
        if draws is None or not whole[i + 1]:
            return [float("nan"), float("nan")]
        vals = [ratio(d, i) for d in draws if d[i + 1]]
        return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]

    return {
        "pairwise_accuracy": ratio(whole, 0),
        "pairwise_accuracy_ci": ci(0),
        "graded_pairs": int(whole[1]),
        "auc": ratio(whole, 2),
        "auc_ci": ci(2),
        "pass_fail_pairs": int(whole[3]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "assets" / "toy" / "flux")
    p.add_argument("--per-caption", type=int, default=32, help="samples per training caption")
    p.add_argument("--sample-steps", type=int, nargs="+", default=[10, 20])
    p.add_argument("--relabel", type=int, default=2, help="other training captions each image is annotated under")
    p.add_argument("--margin", type=float, default=0.05, help="min graded difference for a preference pair")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument(
        "--smooth", type=float, default=0.5, help="Gaussian blur (sigma, px) the scorer applies to its input"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--balance",
        choices=("none", "category"),
        default="none",
        help="pairs per batch: drawn uniformly (none) or from a uniformly chosen caption category (category)",
    )
    p.add_argument(
        "--annotator",
        choices=("geneval", "strict"),
        default="geneval",
        help="what the annotator wants: the GenEval-style pass (the shipped reward_pref) or the strict score",
    )
    p.add_argument(
        "--edits",
        type=int,
        default=0,
        help="edited copies per training sample, one object added or removed (counterfactual pairs for counting); "
        "annotated like the samples, never used for the validation agreement",
    )
    p.add_argument("--val-per-caption", type=int, default=8)
    p.add_argument(
        "--compare",
        nargs="*",
        default=[
            str(ROOT / "assets" / "toy" / "reward_0.safetensors"),
            str(ROOT / "assets" / "toy" / "reward_1.safetensors"),
        ],
        help="other scorers to measure on the same pairs",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--samples",
        type=Path,
        default=None,
        help="cache the generated samples at this path prefix (<prefix>_train/_val.safetensors) and reuse "
        "them when the model, seeds and counts match (reward variants on the same samples)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "toy" / "reward_pref.safetensors")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    train_specs = {caption(s): s for s in split_specs("train")}
    val_specs = {caption(s): s for s in split_specs("validation")}
    images, prompts = cached_generate(
        args.samples,
        "train",
        args.model,
        list(train_specs),
        args.per_caption,
        args.sample_steps,
        10_000 * (args.seed + 1),
    )
    log(f"generated {len(images)} training-caption samples [{time.perf_counter() - t0:.0f} s]")
    n_samples = len(images)
    if args.edits:
        edited, edited_prompts = edited_copies(images, prompts, args.edits, args.seed)
        images, prompts = np.concatenate([images, edited]), prompts + edited_prompts
        log(f"{len(edited)} edited copies (one object added or removed) [{time.perf_counter() - t0:.0f} s]")
    strict = args.annotator == "strict"
    rows = annotate(images, prompts, train_specs, args.relabel, random.Random(args.seed), strict)
    pairs, n_caption = preference_pairs(rows, args.margin)
    own = np.array([s for (_, _, s) in rows[:: args.relabel + 1]])[:n_samples]  # the samples, not their edits
    log(
        f"{len(rows)} annotations, {len(pairs)} preference pairs ({n_caption} same-caption); own-caption pass rate "
        f"{np.mean(own >= 0.5):.3f} [{time.perf_counter() - t0:.0f} s]"
    )
    groups = [train_specs[w[1]].category for w, _ in pairs] if args.balance == "category" else None
    model = train_bt(images, pairs, args.steps, args.batch, args.lr, args.dim, args.smooth, args.seed, log, groups)
    train_seconds = time.perf_counter() - t0
    save_toy_reward(model, args.out)
    own_r = scores_of(model, images[:n_samples], prompts[:n_samples])  # the scale a hinge margin `lam` is set against
    quantiles = {f"p{q}": float(np.percentile(own_r, q)) for q in (5, 50, 95, 99)}
    # held-out agreement: validation captions, fresh noise, never annotated for training
    vimages, vprompts = cached_generate(
        args.samples, "val", args.model, list(val_specs), args.val_per_caption, [20], 77_777
    )
    g = np.array([graded(im, val_specs[q], strict) for im, q in zip(vimages, vprompts)])
    verdicts = [assess(im, val_specs[q]) for im, q in zip(vimages, vprompts)]
    passed = np.array([a.strict if strict else a.passed for a in verdicts])
    own_v = scores_of(model, vimages, vprompts)
    result = {"validation": agreement(own_v, vprompts, g, passed)}
    cats = np.array([val_specs[q].category for q in vprompts])
    result["validation_by_category"] = {
        c: agreement(own_v[cats == c], [q for q, k in zip(vprompts, cats) if k == c], g[cats == c], passed[cats == c])
        for c in sorted(set(cats))
    }
    from leapalign_fast.toy.reward import _load_toy_reward

    for path in args.compare:
        result[Path(path).name] = agreement(
            scores_of(_load_toy_reward(path, 0), vimages, vprompts), vprompts, g, passed
        )
    if len(args.compare) > 1:
        mean = np.mean([scores_of(_load_toy_reward(q, 0), vimages, vprompts) for q in args.compare], axis=0)
        result["compare_mean"] = agreement(mean, vprompts, g, passed)
    result["validation_pass_rate"] = float(passed.mean())
    log(f"agreement with the evaluator on validation-caption samples: {result}")
    write_result(
        args.out.with_suffix(".json"),
        {
            "model": str(args.model),
            "seed": args.seed,
            "annotator": args.annotator,
            "per_caption": args.per_caption,
            "sample_steps": args.sample_steps,
            "relabel": args.relabel,
            "margin": args.margin,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "dim": args.dim,
            "smooth": args.smooth,
            "balance": args.balance,
            "edits": args.edits,
            "train_images": n_samples,
            "edited_images": len(images) - n_samples,
            "annotations": len(rows),
            "pairs": len(pairs),
            "same_caption_pairs": n_caption,
            "train_pass_rate": float(np.mean(own >= 0.5)),
            "val_images": len(vimages),
            "agreement": result,
            "train_sample_reward_quantiles": quantiles,
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`leapalign-fast eval`: sample a prompt file with a checkpoint (or the base model), score every image with a
list of rewards, write a JSON table (mean and std per reward) and PNG grids.

Same building blocks as training: the model loader, the prompt-embedding cache, the sampler and the decoder.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from leapalign_fast import checkpoint as ckpt
from leapalign_fast.build import (
    add_trainable,
    load_components,
    load_trained,
    prompt_cache_intact,
    prompt_embeddings,
    to_device,
)
from leapalign_fast.config import Config
from leapalign_fast.dist_checkpoint import consolidate, is_sharded
from leapalign_fast.dtypes import DTYPES
from leapalign_fast.errors import UserError
from leapalign_fast.images import save_grid
from leapalign_fast.io import write_json_atomic, write_text_atomic
from leapalign_fast.models.backbone import backbone_for
from leapalign_fast.prompts import read_prompt_file
from leapalign_fast.rewards import build_reward
from leapalign_fast.rewards.video import video_reward
from leapalign_fast.sampler import sample_trajectory


def resolve_checkpoint(cfg: Config, which: str, ema: bool = False) -> Path | None:
    """`latest` (newest in output_dir), `base` (the untrained model), or a checkpoint path; verified against
    its manifest. A missing or damaged one is a UserError: never a silent fall-back to another model."""
    with pinned_checkpoint(cfg, which, ema) as (_, shown):
        return shown


@contextlib.contextmanager
def pinned_checkpoint(cfg: Config, which: str, ema: bool = False):
    """As `resolve_checkpoint`, yielding (the folder to read, the checkpoint it stands for). The folder to read is a
    pin (hard links, `checkpoint.pin`) that the live run's pruning or `best/` swap cannot remove under the reader;
    `latest` pruned while being pinned is retried with the newest one then. The pin is removed on exit."""
    if which == "base":
        if ema:
            raise UserError("--ema needs a trained checkpoint; the base model has no EMA")
        yield None, None
        return
    for _ in range(5):
        path = _named_checkpoint(cfg, which)
        try:
            pinned = ckpt.pin(path)
        except FileNotFoundError:
            if which == "latest":
                continue  # pruned under us: the next newest
            raise UserError(
                f"checkpoint {path} was removed while eval read it (pruned by a live run?); pass 'latest' or a "
                "newer checkpoint with --checkpoint"
            ) from None
        break
    else:
        raise UserError(
            f"the newest checkpoint in {ckpt.checkpoint_root(cfg.output_dir)} was removed 5 times while eval read "
            "it (a live run with keep_checkpoints=1 saving every step?); retry, or pass a checkpoint that is kept"
        )
    try:
        read = pinned or path
        problem = ckpt.verify_checkpoint(read)
        if problem is not None:
            raise UserError(f"checkpoint {path} is damaged ({problem}); pass an intact one with --checkpoint")
        if ema and not is_sharded(read) and not (read / "ema.safetensors").is_file():
            raise UserError(f"checkpoint {path} has no EMA (the run had ema_decay=0); drop --ema")
        yield read, path
    finally:
        ckpt.unpin(pinned)


def _named_checkpoint(cfg: Config, which: str) -> Path:
    if which == "latest":
        found = ckpt.list_checkpoints(cfg.output_dir)
        if not found:
            raise UserError(
                f"no checkpoint in {ckpt.checkpoint_root(cfg.output_dir)}; check output_dir (is it the "
                "run's directory?), or pass --checkpoint base to score the untrained model"
            )
        return found[-1]
    path = Path(which)
    if not (path / "trained.safetensors").is_file() and not is_sharded(path):
        raise UserError(
            f"--checkpoint {path} is not a checkpoint directory (no trained.safetensors); "
            f"use one under {ckpt.checkpoint_root(cfg.output_dir)}, 'latest' or 'base'"
        )
    return path


def sample_images(
    cfg: Config,
    prompts: list[str],
    path: Path | None,
    ema: bool = False,
    num_steps: int = 50,
    batch_size: int = 4,
    seed: int = 0,
    per_prompt_noise: bool = False,
):
    """Yield (indices, images (b, 3, H, W) in [0, 1]) for `prompts`, sampled with the checkpoint at `path`
    (its trained or EMA weights) or the base model (`path` None), from noise seeded by `seed` (one stream; with
    `per_prompt_noise` prompt i's noise is seeded by seed + i, whatever the batch size)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = backbone_for(cfg.model)  # resolved once, here, for everything below
    comps = load_components(cfg, backbone, need_text=not prompt_cache_intact(cfg, backbone, prompts))  # or damaged
    embeds = prompt_embeddings(cfg, backbone, comps, prompts)
    comps.text = None
    dtype = DTYPES[cfg.model.dtype]
    transformer = to_device(comps.transformer, device, dtype)
    if path is not None:  # the trained parameters, by name, onto the same architecture (LoRA added as in training)
        add_trainable(transformer, cfg, backbone)
        which = "ema" if ema else "trained"
        # FSDP checkpoints: the shards consolidated here, in one process (any world size wrote them)
        weights = consolidate(path, which) if is_sharded(path) else ckpt.read_weights(path, which)
        load_trained(transformer, weights, path)
    transformer.eval()
    vae = comps.vae.to(device)
    geom = backbone.layout(comps, cfg.image_size, cfg.num_frames)
    sigmas = backbone.schedule(comps, num_steps, geom)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        cond = {k: v.to(device) for k, v in embeds.tensors(idx, backbone.conditioning).items()}
        velocity = backbone.velocity(transformer, cond, geom, cfg.guidance, uncond_grad=cfg.model.uncond_grad)
        if per_prompt_noise:
            shape = geom.noise_shape(1)
            noise = torch.cat([torch.randn(*shape, generator=torch.Generator().manual_seed(seed + i)) for i in idx])
        else:
            noise = torch.randn(*geom.noise_shape(len(idx)), generator=gen)
        noise = noise.to(device, backbone.noise_dtype(dtype))
        with torch.no_grad():
            yield idx, backbone.decode(vae, sample_trajectory(velocity, noise, sigmas).x0, geom)


def evaluate(
    cfg: Config,
    prompt_file: str | None,
    rewards: list[str],
    which: str = "latest",
    ema: bool = False,
    num_steps: int = 50,
    batch_size: int = 4,
    seed: int = 0,
    out: Path | None = None,
) -> dict:
    prompts = read_prompt_file(prompt_file) if prompt_file else list(cfg.eval_prompts)
    scores, shown, out = _sample_and_score(cfg, prompts, rewards, which, ema, num_steps, batch_size, seed, out)
    table = {name: _stats(v) for name, v in scores.items()}
    result = {
        "checkpoint": str(shown) if shown else "base",
        "ema": ema,
        "num_steps": num_steps,
        "seed": seed,
        "prompts": prompts,
        "scores": table,
        "per_prompt": scores,
    }
    write_json_atomic(out / "scores.json", result)
    return result


def _reward_options(cfg: Config, name: str) -> dict:
    """The options of reward `name`: `reward.options.<name>` (a table), or `reward.options` when `name` is the
    run's reward; none otherwise (a reward by name alone reads its published weights through the Hub cache)."""
    table = cfg.reward.options.get(name)
    if isinstance(table, dict):
        return table
    return dict(cfg.reward.options) if name == cfg.reward.name else {}


def _sample_and_score(
    cfg: Config,
    prompts: list[str],
    rewards: list[str],
    which: str,
    ema: bool,
    num_steps: int,
    batch_size: int,
    seed: int,
    out: Path | None,
    per_prompt_noise: bool = False,
    label_suffix: str = "",
):
    """({reward: per-prompt scores}, the checkpoint shown, the output folder): every image scored by every reward
    as it is sampled, and saved in grids of `batch_size`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if num_steps < 1 or batch_size < 1:
        raise UserError(f"--steps and --batch must be >= 1, got --steps {num_steps} --batch {batch_size}")
    with pinned_checkpoint(cfg, which, ema) as (path, shown):
        scorers = {}
        for name in rewards:  # fail on a bad reward before any sampling
            scorers[name] = video_reward(build_reward(name, **_reward_options(cfg, name))).to(device)  # per frame
        label = (f"{shown.name}{'_ema' if ema else ''}" if shown else "base") + label_suffix
        out = Path(out or Path(cfg.output_dir) / "eval" / label)
        scores = {name: [] for name in rewards}
        for idx, images in sample_images(cfg, prompts, path, ema, num_steps, batch_size, seed, per_prompt_noise):
            with torch.no_grad():
                for name, scorer in scorers.items():
                    scores[name] += scorer(images, [prompts[i] for i in idx]).float().cpu().tolist()
            save_grid(images, out / f"grid_{idx[0] // batch_size:04d}.png")
    return scores, shown, out


# ---- the published evaluation protocols -----------------------------------------------------------------------

BENCHMARK_REWARDS = ["hpsv2.1", "pickscore", "imagereward", "clip", "aesthetic"]
METRIC_NAMES = {
    "hpsv2.1": "HPSv2.1",
    "pickscore": "PickScore",
    "imagereward": "ImageReward",
    "clip": "CLIP",
    "aesthetic": "Aesthetic",
}
# --benchmark name -> the prompt set it samples (prompts.PROMPT_SETS)
BENCHMARKS = {"hpdv2": "hpdv2-test", "hpsv2": "hpdv2-benchmark"}
BENCHMARK_STEPS = 50  # the LeapAlign paper and FlowBP both sample their evaluation images with 50 steps
BENCHMARK_SEED = 42  # FlowBP's evaluation seed (its noise comes from its own pipeline: not the same images)


def benchmark(
    cfg: Config,
    name: str,
    which: str = "latest",
    ema: bool = False,
    batch_size: int = 4,
    limit: int = 0,
    local_copy: str | None = None,
    num_steps: int = BENCHMARK_STEPS,
    out: Path | None = None,
) -> dict:
    """Sample a benchmark's prompts (one image each, prompt i's noise from seed 42 + i), score every image with
    HPSv2.1, PickScore, ImageReward, CLIP and the LAION aesthetic predictor, and write `benchmark.json` and
    `benchmark.md`: per style and their mean, in the layout of the published tables. `limit`: the first N prompts of
    each style (a smoke run; the table says so). `local_copy`: the set's files from a folder or hf:// URL."""
    from leapalign_fast.prompts import resolve_prompt_set

    if name not in BENCHMARKS:
        raise UserError(f"--benchmark {name}: unknown; choose one of {', '.join(BENCHMARKS)}")
    if limit < 0:
        raise UserError(f"--limit must be >= 0 (0: every prompt), got {limit}")
    spec = BENCHMARKS[name] + (f":{local_copy}" if local_copy else "")
    pset = resolve_prompt_set(spec)
    keep, seen = [], {}
    for i, style in enumerate(pset.styles):
        seen[style] = seen.get(style, 0) + 1
        if not limit or seen[style] <= limit:
            keep.append(i)
    prompts, styles = [pset.prompts[i] for i in keep], [pset.styles[i] or "all" for i in keep]
    scores, shown, out = _sample_and_score(
        cfg, prompts, BENCHMARK_REWARDS, which, ema, num_steps, batch_size, BENCHMARK_SEED, out, True, f"_{name}"
    )
    order = list(dict.fromkeys(styles))
    rows = {st: {m: _stats([v for v, s in zip(scores[m], styles) if s == st]) for m in scores} for st in order}
    if len(order) > 1:  # HPS v2's "Averaged": the mean of the styles' means
        rows["mean"] = {m: {"mean": sum(rows[st][m]["mean"] for st in order) / len(order)} for m in scores}
    result = {
        "benchmark": name,
        "checkpoint": str(shown) if shown else "base",
        "ema": ema,
        "prompt_set": {"name": pset.name, "source": pset.source, "sha256": pset.sha256, "count": len(pset.prompts)},
        "prompts_scored": len(prompts),
        "limit_per_style": limit,
        "settings": {
            "num_steps": num_steps,
            "guidance": cfg.guidance,
            "height_width": list(cfg.image_size),
            "seed": f"{BENCHMARK_SEED} + prompt index",
            "images_per_prompt": 1,
            "model": cfg.model.source + (f"@{cfg.model.revision}" if cfg.model.revision else ""),
            "dtype": cfg.model.dtype,
        },
        "styles": list(rows),  # the rows' order (the JSON file sorts keys)
        "rows": rows,
        "per_prompt": {"prompts": prompts, "styles": styles, **scores},
    }
    write_json_atomic(out / "benchmark.json", result)
    table = benchmark_table(result)
    write_text_atomic(out / "benchmark.md", table)
    result["table"], result["out"] = table, str(out)
    return result


def benchmark_table(result: dict) -> str:
    """Markdown: one row per style (and the mean over styles), one column per metric (raw scores: HPSv2.1 as the
    cosine, e.g. 0.3016, as the LeapAlign paper and FlowBP report it; HPS v2's own benchmark prints it x100)."""
    metrics = list(METRIC_NAMES)
    head = "| " + " | ".join(["style", *(METRIC_NAMES[m] for m in metrics)]) + " |"
    lines = [head, "|---" + "|---:" * len(metrics) + "|"]
    for style, row in result["rows"].items():
        lines.append("| " + " | ".join([style, *(f"{row[m]['mean']:.4f}" for m in metrics)]) + " |")
    n, total = result["prompts_scored"], result["prompt_set"]["count"]
    note = f"{n} of {total} prompts" + (
        f" (--limit {result['limit_per_style']} per style: a smoke run)" if n < total else ""
    )
    st = result["settings"]
    lines += [
        "",
        f"{result['benchmark']}: {note}; {result['checkpoint']}{' (EMA)' if result['ema'] else ''}; "
        f"{st['num_steps']} steps, guidance {st['guidance']}, {st['height_width'][0]}x{st['height_width'][1]}, "
        f"seed {st['seed']}; prompt set sha256 {result['prompt_set']['sha256'][:16]}",
    ]
    return "\n".join(lines) + "\n"


def _stats(v: list[float]) -> dict:
    return {"mean": sum(v) / len(v), "std": _std(v), "n": len(v)}


def _std(v: list[float]) -> float:
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0

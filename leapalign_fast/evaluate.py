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
from leapalign_fast.io import write_json_atomic
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
):
    """Yield (indices, images (b, 3, H, W) in [0, 1]) for `prompts`, sampled with the checkpoint at `path`
    (its trained or EMA weights) or the base model (`path` None), from noise seeded by `seed`."""
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
        noise = torch.randn(*geom.noise_shape(len(idx)), generator=gen).to(device, backbone.noise_dtype(dtype))
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = read_prompt_file(prompt_file) if prompt_file else list(cfg.eval_prompts)
    if num_steps < 1 or batch_size < 1:
        raise UserError(f"--steps and --batch must be >= 1, got --steps {num_steps} --batch {batch_size}")
    with pinned_checkpoint(cfg, which, ema) as (path, shown):
        scorers = {}
        for name in rewards:  # fail on a bad reward before any sampling
            opts = cfg.reward.options.get(name, cfg.reward.options if name == cfg.reward.name else {})
            scorers[name] = video_reward(build_reward(name, **opts)).to(device)  # per frame on a video
        label = f"{shown.name}{'_ema' if ema else ''}" if shown else "base"
        out = Path(out or Path(cfg.output_dir) / "eval" / label)
        scores = {name: [] for name in rewards}
        for idx, images in sample_images(cfg, prompts, path, ema, num_steps, batch_size, seed):
            with torch.no_grad():
                for name, scorer in scorers.items():
                    scores[name] += scorer(images, [prompts[i] for i in idx]).float().cpu().tolist()
            save_grid(images, out / f"grid_{idx[0] // batch_size:04d}.png")
    table = {name: {"mean": sum(v) / len(v), "std": _std(v), "n": len(v)} for name, v in scores.items()}
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


def _std(v: list[float]) -> float:
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0

"""Pretrain the toy benchmark's tiny FLUX (the real diffusers classes) on procedural captioned scenes.

    python bench/pretrain_toy.py --vae-steps 1500 --flow-steps 4000 --seed 0 --out assets/toy/flux
    python bench/pretrain_toy.py --init-from assets/toy/flux --flow-steps 4000 --batch 32 --lr 5e-4 --decay cosine \
        --out /tmp/flux_longer      # continue a pretrained model: its VAE and text encoders kept, the transformer
        trained on

Stage 1 trains a 16-channel AutoencoderKL (8x downsampling: 64 px -> 8x8 latents) on rendered scenes and sets its
FLUX-style `scaling_factor`/`shift_factor` from the latent statistics. Stage 2 trains a FluxTransformer2DModel
with rectified-flow matching (x_t = (1-t) x_0 + t eps, target eps - x_0, logit-normal t) on the packed latents,
conditioned on frozen random-init CLIP/T5 text encoders of the real classes (distinct embeddings per word).
The result is a diffusers-format directory that `model.source=<dir>` loads; a JSON beside it records the
command, seed, steps and losses.

FLUX-only by design: the toy benchmark's generator is a tiny FLUX.1 (the shipped assets/toy/flux and every toy
result in the README were made with it). What touches the model goes through the backbone interface
(models/backbone.py: `load`, `encode_prompts`, `encode_images`, `geometry`, `velocity`); only building the untrained
classes and writing the directory (`save_flux`) are FLUX's own.
"""

from __future__ import annotations

import argparse
import math
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
from leapalign_fast.models.backbone import get_backbone  # noqa: E402
from leapalign_fast.models.flux import FluxComponents, save_flux  # noqa: E402
from leapalign_fast.models.text import build_tiny_text_stack  # noqa: E402
from leapalign_fast.toy.scenes import render, sample_scene  # noqa: E402

BACKBONE = get_backbone("flux")  # the toy generator's family
RESOLUTION = 64  # the toy scenes' size in pixels


def scenes(rng: random.Random, n: int):
    batch = [sample_scene(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([render(s.objects) for s in batch]))
    return images, [s.caption for s in batch]


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 16, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_transformer(width: int, layers: int):
    from diffusers import FluxTransformer2DModel

    heads = width // 16
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=layers,
        num_single_layers=layers,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )


def train_vae(vae, steps: int, batch: int, rng, log) -> list[float]:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=1e-4)
    losses = []
    for step in range(steps):
        images, _ = scenes(rng, batch)
        x = images * 2 - 1
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {np.mean(losses[-50:]):.5f}")
    with torch.no_grad():  # FLUX-style latent normalisation from the data
        z = torch.cat([vae.encode(scenes(rng, 64)[0] * 2 - 1).latent_dist.mode() for _ in range(4)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return losses


@torch.no_grad()
def latent_bank(comps, n: int, rng) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n scenes encoded once: packed normalised latents (n, L, C) = (n, 16, 64) and their captions' conditioning
    (the velocity's tensors, n rows each)."""
    xs, captions = [], []
    for _ in range(0, n, 256):
        images, caps = scenes(rng, 256)
        xs.append(BACKBONE.encode_images(comps.vae, images))
        captions += caps
    unique = list(dict.fromkeys(captions))
    cond = BACKBONE.encode_prompts(comps.text, unique)
    index = torch.tensor([unique.index(c) for c in captions])
    return torch.cat(xs), {k: cond[k][index] for k in BACKBONE.conditioning}


def lr_factor(step: int, steps: int, decay: str, warmup: int = 200) -> float:
    """Linear warm-up over `warmup` steps, then constant (`none`) or cosine decay to 0 at `steps` (`cosine`)."""
    warm = min(1.0, (step + 1) / warmup)
    return warm if decay == "none" else warm * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def train_flow(
    comps,
    steps: int,
    batch: int,
    lr: float,
    rng,
    log,
    bank_size: int = 8192,
    decay: str = "none",
    save=None,
    save_every: int = 0,
    caption_dropout: float = 0.0,
    mg_scale: float = 0.0,
    mg_ramp: int = 0,
    t_dist: str = "logit-normal",
) -> list[float]:
    """Rectified-flow training of `comps.transformer`. `caption_dropout` > 0 replaces that fraction of captions by
    the empty caption (an unconditional branch); `mg_scale` = w > 0 (needs caption dropout) trains the conditional
    branch toward `eps - x0 + w * sg(v(x_t, c) - v(x_t, empty))`, model guidance (Tang et al., 2025): the fixed point
    is the CFG velocity of scale 1/(1-w), baked into the conditional model, so sampling needs no second forward and
    no trainer change; w ramps linearly from 0 over `mg_ramp` steps. Defaults (0): the plain recipe, bit-identical."""
    transformer = comps.transformer
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, decay))
    geom = BACKBONE.geometry(comps, RESOLUTION)
    bank_x, bank_cond = latent_bank(comps, bank_size, rng)
    log(f"latent bank: {tuple(bank_x.shape)}, std {bank_x.std():.3f}")
    if mg_scale > 0 and caption_dropout <= 0:
        raise SystemExit("--mg-scale needs --caption-dropout > 0 (the unconditional branch it reads)")
    if caption_dropout > 0:
        with torch.no_grad():
            empty_all = BACKBONE.encode_prompts(comps.text, [""])
        empty = {k: empty_all[k] for k in BACKBONE.conditioning}
    losses = []
    for step in range(steps):
        pick = torch.randint(len(bank_x), (batch,))
        x0, cond = bank_x[pick], {k: v[pick] for k, v in bank_cond.items()}
        eps = torch.randn(*geom.noise_shape(batch))  # (B, L, C)
        # logit-normal times, as SD3/FLUX training; `uniform` also trains the low-noise end (edges, corners)
        t = torch.sigmoid(torch.randn(batch)) if t_dist == "logit-normal" else torch.rand(batch)
        xt = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
        target = eps - x0
        if caption_dropout > 0:
            drop = torch.rand(batch) < caption_dropout
            w = mg_scale * (min(1.0, step / mg_ramp) if mg_ramp else 1.0)
            if w > 0:
                with torch.no_grad():
                    both = {k: torch.cat([v, empty[k].expand_as(v)]) for k, v in cond.items()}
                    guided = BACKBONE.velocity(transformer, both, geom, 3.5)
                    vc, vu = guided(torch.cat([xt, xt]), torch.cat([t, t])).chunk(2)
                target = target + w * (~drop).view(-1, 1, 1).float() * (vc - vu)
            cond = {
                k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), empty[k].expand_as(v), v) for k, v in cond.items()
            }
        v = BACKBONE.velocity(transformer, cond, geom, 3.5)(xt, t)
        loss = F.mse_loss(v, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"flow step {step}: loss {np.mean(losses[-50:]):.5f}")
        if save is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(step + 1, losses)  # a long run cut short still leaves a usable model
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--flow-steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bank", type=int, default=8192, help="scenes encoded once for the flow stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decay", choices=("none", "cosine"), default="none", help="flow-stage lr after warm-up")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="a pretrained toy FLUX directory: keep its VAE and "
        "text encoders, continue training its transformer (no VAE stage)",
    )
    p.add_argument(
        "--components-from",
        type=Path,
        default=None,
        help="a pretrained toy FLUX directory: keep its "
        "VAE and text encoders (no VAE stage), train a fresh transformer of --width/--layers",
    )
    p.add_argument(
        "--caption-dropout",
        type=float,
        default=0.0,
        help="fraction of captions replaced by the empty "
        "caption in the flow stage (an unconditional branch for --mg-scale)",
    )
    p.add_argument(
        "--mg-scale",
        type=float,
        default=0.0,
        help="model guidance w in [0, 1): the conditional branch learns the CFG velocity of scale 1/(1-w) (0: off)",
    )
    p.add_argument("--mg-ramp", type=int, default=0, help="flow steps over which w ramps up from 0")
    p.add_argument(
        "--t-dist", choices=("logit-normal", "uniform"), default="logit-normal", help="flow-stage time distribution"
    )
    p.add_argument("--save-every", type=int, default=0, help="also write the model every n flow steps (0: at the end)")
    p.add_argument(
        "--then-steps",
        type=int,
        default=0,
        help="a second flow stage in the same command: continue the "
        "transformer for this many steps with a fresh optimizer, as --init-from on the first stage's output would "
        "(0: one stage)",
    )
    p.add_argument("--then-lr", type=float, default=3e-4, help="second stage: peak lr")
    p.add_argument("--then-bank", type=int, default=16384, help="second stage: scenes in its latent bank")
    p.add_argument("--then-seed", type=int, default=1, help="second stage: torch and scene seed (a fresh bank)")
    p.add_argument("--then-decay", choices=("none", "cosine"), default="cosine", help="second stage: lr decay")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "toy" / "flux")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if args.init_from is not None:
        comps = BACKBONE.load(args.init_from, torch.float32, max_sequence_length=32)
        comps.transformer.train().requires_grad_(True)
        comps.vae.requires_grad_(False)
        vae_losses = [float("nan")]
        args.vae_steps, args.width, args.layers = (
            0,
            comps.transformer.config.num_attention_heads * 16,
            comps.transformer.config.num_layers,
        )
    elif args.components_from is not None:
        base = BACKBONE.load(args.components_from, torch.float32, max_sequence_length=32)
        base.vae.requires_grad_(False)
        torch.manual_seed(args.seed)  # the fresh transformer's init depends on the seed only
        comps = FluxComponents(build_transformer(args.width, args.layers), base.vae, base.text)
        vae_losses, args.vae_steps = [float("nan")], 0
    else:
        vae = build_vae()
        vae_losses = train_vae(vae, args.vae_steps, args.batch, rng, log)
        vae.eval().requires_grad_(False)
        text = build_tiny_text_stack(32, 32, seed=args.seed + 1)  # seeds torch: before the transformer's init
        comps = FluxComponents(build_transformer(args.width, args.layers), vae, text)

    def save(step: int, flow_losses: list[float]) -> None:
        save_flux(comps, args.out)
        write_result(
            args.out.parent / f"{args.out.name}.json",
            {
                "seed": args.seed,
                "vae_steps": args.vae_steps,
                "flow_steps": args.flow_steps,
                "flow_steps_done": step,
                "batch": args.batch,
                "width": args.width,
                "layers": args.layers,
                "lr": args.lr,
                "bank": args.bank,
                "decay": args.decay,
                "init_from": str(args.init_from) if args.init_from else None,
                **({"components_from": str(args.components_from)} if args.components_from else {}),
                **({"t_dist": args.t_dist} if args.t_dist != "logit-normal" else {}),
                **(
                    {"caption_dropout": args.caption_dropout, "mg_scale": args.mg_scale, "mg_ramp": args.mg_ramp}
                    if args.caption_dropout
                    else {}
                ),
                **(
                    {
                        "then_steps": args.then_steps,
                        "then_lr": args.then_lr,
                        "then_bank": args.then_bank,
                        "then_seed": args.then_seed,
                        "then_decay": args.then_decay,
                        "first_stage_final_loss": stage1_loss[0],
                    }
                    if args.then_steps
                    else {}
                ),
                "train_seconds": time.perf_counter() - t0,
                "vae_final_loss": float(np.mean(vae_losses[-100:])),
                "flow_final_loss": float(np.mean(flow_losses[-100:])),
            },
        )

    stage1_loss = [float("nan")]

    flow_losses = train_flow(
        comps,
        args.flow_steps,
        args.batch,
        args.lr,
        rng,
        log,
        args.bank,
        args.decay,
        save,
        args.save_every,
        args.caption_dropout,
        args.mg_scale,
        args.mg_ramp,
        args.t_dist,
    )
    if args.then_steps:
        # exactly what `--init-from <first stage> --flow-steps N --seed S` does in a new process: fresh optimizer
        # and schedule, torch and scene RNGs reseeded, a new latent bank
        stage1_loss[0] = float(np.mean(flow_losses[-100:]))
        log(f"first stage done ({stage1_loss[0]:.5f}); second stage: {args.then_steps} steps, lr {args.then_lr}")
        torch.manual_seed(args.then_seed)
        rng = random.Random(args.then_seed)
        flow_losses = train_flow(
            comps, args.then_steps, args.batch, args.then_lr, rng, log, args.then_bank, args.then_decay
        )
    comps.transformer.eval()
    save(args.flow_steps + args.then_steps, flow_losses)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`toy`: a small differentiable image-caption scorer trained on the procedural scenes (never the evaluator).

Image: strided convolutions; caption: token embeddings (tiny CLIP tokenizer) through a GRU; the caption
vector modulates the image features (FiLM), coordinates are appended, then max/mean pooling and an MLP; output the
logit of "does this image show this caption". Trained with binary cross-entropy on (scene, its caption) vs
(scene, another caption or one differing in one attribute: colour, shape, count or relation), on crisp and
blurred renders.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from leapalign_fast.errors import UserError
from leapalign_fast.io import save_tensors_atomic
from leapalign_fast.models.text import build_tiny_clip_tokenizer
from leapalign_fast.rewards import register_reward
from leapalign_fast.toy.scenes import COLOURS, NUMBERS, RELATIONS, SHAPES, Spec, caption, render, sample_scene

MAX_TOKENS = 16


class ToyReward(torch.nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.tokenizer = build_tiny_clip_tokenizer()
        self.embed = torch.nn.Embedding(len(self.tokenizer), dim)
        self.gru = torch.nn.GRU(dim, dim, batch_first=True)
        self.film = torch.nn.Linear(dim, 2 * dim)  # caption -> per-channel scale and shift of the image features
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.GELU(), torch.nn.Conv2d(32, dim, 3, 2, 1), torch.nn.GELU(),
            torch.nn.Conv2d(dim, dim, 3, 1, 1),
        )  # fmt: skip
        self.mix = torch.nn.Sequential(torch.nn.Conv2d(dim + 2, dim, 3, 1, 1), torch.nn.GELU(),
                                       torch.nn.Conv2d(dim, dim, 3, 1, 1), torch.nn.GELU())  # fmt: skip
        self.head = torch.nn.Sequential(torch.nn.Linear(3 * dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, 1))

    def text(self, prompts: list[str], device) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        out, _ = self.gru(self.embed(tok.input_ids.to(device)))  # (B, T, dim)
        mask = tok.attention_mask.to(device).unsqueeze(-1).float()
        return (out * mask).sum(1) / mask.sum(1)  # mean over the caption's real tokens

    def logits(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.shape[-1] != 64:
            images = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        feat = self.conv(images.float())  # (B, dim, 16, 16)
        text = self.text(prompts, images.device)
        scale, shift = self.film(text).chunk(2, dim=-1)
        feat = feat * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        b, _, h, w = feat.shape  # coordinates let the mixer reason about left/right/above/below
        ys = torch.linspace(-1, 1, h, device=feat.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=feat.device).view(1, 1, 1, w).expand(b, 1, h, w)
        feat = self.mix(torch.cat([feat, ys, xs], dim=1))
        pooled = torch.cat([feat.amax(dim=(2, 3)), feat.mean(dim=(2, 3)), text], dim=-1)
        return self.head(pooled).squeeze(-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The logit of "this image shows this caption": unbounded, so a hinge `max(0, lam - r)` keeps a
        constant gradient until the margin is reached (a sigmoid would saturate on poor samples)."""
        return self.logits(images, prompts)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 3, H, W): the soft edges a small generator draws."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).to(images.device)
    c = images.shape[1]
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def perturb(spec: Spec, rng: random.Random) -> Spec:
    """A spec that differs from `spec` in one attribute (a hard negative caption)."""
    objs = list(spec.objects)
    options = ["shape"] + (["colour"] if any(c for c, _ in objs) else [])
    options += ["count"] if spec.category == "counting" else []
    options += ["relation", "swap"] if spec.category == "position" else []
    options += ["swap"] if spec.category == "binding" else []
    kind = rng.choice(options)
    i = rng.randrange(len(objs))
    c, s = objs[i]
    if kind == "shape":
        objs[i] = (c, rng.choice([x for x in SHAPES if x != s]))
    elif kind == "colour" and c:
        objs[i] = (rng.choice([x for x in COLOURS if x != c]), s)
    elif kind == "count":
        return Spec(spec.category, spec.objects, count=rng.choice([n for n in NUMBERS if n != spec.count]))
    elif kind == "relation":
        return Spec(spec.category, spec.objects, relation=rng.choice([r for r in RELATIONS if r != spec.relation]))
    elif kind == "swap":  # attributes bound to the wrong objects
        (c0, s0), (c1, s1) = objs
        objs = [(c1, s0), (c0, s1)]
    return Spec(spec.category, tuple(objs), spec.count, spec.relation)


def training_batch(rng: random.Random, n: int, noise: float = 0.1, hard: float = 0.5):
    """n positives and n negatives, a fraction `hard` of them one-attribute perturbations and the rest another
    scene's caption: (images (2n, 3, 64, 64), captions, labels (2n,))."""
    images, captions, labels = [], [], []
    for _ in range(n):
        scene = sample_scene(rng)
        img = render(scene.objects)
        img = np.clip(img + np.random.default_rng(rng.randrange(2**31)).normal(0, noise * rng.random(), img.shape), 0, 1)
        negative = caption(perturb(scene.spec, rng)) if rng.random() < hard else sample_scene(rng).caption
        images += [img, img]
        captions += [scene.caption, negative if negative != scene.caption else caption(perturb(scene.spec, rng))]
        labels += [1.0, 0.0]
    return torch.from_numpy(np.stack(images)).float(), captions, torch.tensor(labels)


def train_toy_reward(steps: int, batch: int, seed: int, lr: float = 2e-3, log=print) -> ToyReward:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = ToyReward()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        images, captions, labels = training_batch(rng, batch)
        if rng.random() < 0.7:  # generated images are soft-edged: train on blurred scenes too
            images = gaussian_blur(images, rng.uniform(0.5, 2.0))
        loss = F.binary_cross_entropy_with_logits(model.logits(images, captions), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"toy reward step {step}: bce {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: ToyReward, n: int, seed: int) -> float:
    """Pairwise accuracy on fresh scenes: the true caption scores above its one-attribute negative."""
    images, captions, _ = training_batch(random.Random(seed), n, noise=0.0, hard=1.0)
    s = model(images, captions)
    return float((s[0::2] > s[1::2]).float().mean())


def save_toy_reward(model: ToyReward, path: Path) -> None:
    save_tensors_atomic(dict(model.state_dict()), path)


@register_reward("toy")
def build_toy_reward(path: str | None = None) -> torch.nn.Module:
    p = Path(path or "")
    if not path or not p.is_file():
        raise UserError(f"reward 'toy' needs reward.options.path: the safetensors file written by "
                        f"bench/train_toy_reward.py (shipped as assets/toy/reward.safetensors); {p} not found")  # fmt: skip
    model = ToyReward()
    state = load_file(str(p))
    model.load_state_dict(state)
    return model

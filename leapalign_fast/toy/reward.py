"""`toy`: a small differentiable image-caption scorer trained on the procedural scenes (never the evaluator).

Image: strided convolutions; caption: token embeddings (tiny CLIP tokenizer) through a GRU; the caption
vector modulates the image features (FiLM), coordinates are appended, then max/mean pooling and an MLP; output the
logit of "does this image show this caption". Trained with binary cross-entropy on (scene, its caption) vs
(scene, another caption or one differing in one attribute: colour, shape, count or relation), on crisp and
blurred renders.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from leapalign_fast.errors import UserError
from leapalign_fast.io import save_tensors_atomic
from leapalign_fast.models.text import build_tiny_clip_tokenizer
from leapalign_fast.toy.scenes import (
    COLOURS,
    NUMBERS,
    RELATIONS,
    SHAPES,
    Obj,
    Scene,
    Spec,
    caption,
    parse_caption,
    render,
    sample_scene,
)

MAX_TOKENS = 16


class ToyReward(torch.nn.Module):
    def __init__(self, dim: int = 64, smooth: float = 0.0):
        super().__init__()
        # Gaussian blur (sigma, px) of the input, saved with the weights: a generator cannot raise the score with
        # pixel-level patterns the blur removes (the first shipped reward, without it, was hacked that way)
        self.register_buffer("smooth", torch.tensor(float(smooth)))
        self.contrast = 0  # near-miss captions subtracted in forward (set by the builder)
        self.tokenizer = build_tiny_clip_tokenizer()
        self.embed = torch.nn.Embedding(len(self.tokenizer), dim)
        self.gru = torch.nn.GRU(dim, dim, batch_first=True)
        self.film = torch.nn.Linear(dim, 2 * dim)  # caption -> per-channel scale and shift of the image features
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, 2, 1),
            torch.nn.GELU(),
            torch.nn.Conv2d(32, dim, 3, 2, 1),
            torch.nn.GELU(),
            torch.nn.Conv2d(dim, dim, 3, 1, 1),
        )
        self.mix = torch.nn.Sequential(
            torch.nn.Conv2d(dim + 2, dim, 3, 1, 1), torch.nn.GELU(), torch.nn.Conv2d(dim, dim, 3, 1, 1), torch.nn.GELU()
        )
        self.head = torch.nn.Sequential(torch.nn.Linear(3 * dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, 1))

    def text(self, prompts: list[str], device) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        out, _ = self.gru(self.embed(tok.input_ids.to(device)))  # (B, T, dim)
        mask = tok.attention_mask.to(device).unsqueeze(-1).float()
        return (out * mask).sum(1) / mask.sum(1)  # mean over the caption's real tokens

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != 64:
            images = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        sigma = float(self.smooth)
        images = gaussian_blur(images.float(), sigma) if sigma > 0 else images.float()
        return self.conv(images)  # (B, dim, 16, 16)

    def score(self, feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(text).chunk(2, dim=-1)
        feat = feat * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        b, _, h, w = feat.shape  # coordinates let the mixer reason about left/right/above/below
        ys = torch.linspace(-1, 1, h, device=feat.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=feat.device).view(1, 1, 1, w).expand(b, 1, h, w)
        feat = self.mix(torch.cat([feat, ys, xs], dim=1))
        pooled = torch.cat([feat.amax(dim=(2, 3)), feat.mean(dim=(2, 3)), text], dim=-1)
        return self.head(pooled).squeeze(-1)

    def logits(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score(self.image_features(images), self.text(prompts, images.device))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The logit of "this image shows this caption": unbounded, so a hinge `max(0, lam - r)` keeps a
        constant gradient until the margin is reached (a sigmoid would saturate on poor samples). With
        `contrast = K > 0`, minus the mean logit of K near-miss captions (one attribute changed, fixed per caption):
        an image that shows many captions at once, or none, scores about 0; only showing this caption better
        than its near misses scores high."""
        feat = self.image_features(images)
        out = self.score(feat, self.text(prompts, images.device))
        if self.contrast > 0:
            refs = [near_misses(p, self.contrast) for p in prompts]
            for k in range(self.contrast):
                out = out - self.score(feat, self.text([r[k] for r in refs], images.device)) / self.contrast
        return out


def near_misses(prompt: str, k: int) -> list[str]:
    """k captions that differ from `prompt` in one attribute, the same for the same prompt."""
    spec = parse_caption(prompt)
    if spec is None:
        raise UserError(
            f"reward 'toy' with contrast > 0 scores captions of the toy grammar (leapalign_fast/toy/"
            f"scenes.py, e.g. 'a red circle left of a blue square'); cannot parse prompt {prompt!r}"
        )
    rng = random.Random(zlib.crc32(prompt.encode()))
    out = []
    for _ in range(k):
        for _ in range(20):
            miss = caption(perturb(spec, rng))
            if miss != prompt:
                break
        out.append(miss)
    return out


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 3, H, W): the soft edges a small generator draws."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).to(images.device)
    c = images.shape[1]
    out = F.conv2d(
        F.pad(images, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c
    )
    return F.conv2d(
        F.pad(out, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c
    )


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


def _drop_one(scene, rng: random.Random) -> list | None:
    """The scene's objects with one removed (a near-miss for counting and two-object captions), or None."""
    if len(scene.objects) < 2:
        return None
    objs = list(scene.objects)
    objs.pop(rng.randrange(len(objs)))
    return objs


def _junk(rng: random.Random, np_rng: np.random.Generator) -> np.ndarray:
    """An image that shows no caption: black, faint noise or texture, faded shapes, or clutter. A generator pushed by a
    reward that never saw such images learns to paint them (dim textures the reward scores highly)."""
    kind = rng.randrange(4)
    if kind == 3:  # clutter: many shapes at once, which shows no caption of one or two objects
        return render(
            [
                Obj(
                    rng.choice(SHAPES),
                    rng.choice(list(COLOURS)),
                    rng.uniform(6, 58),
                    rng.uniform(6, 58),
                    rng.uniform(5, 12),
                )
                for _ in range(rng.randint(5, 12))
            ]
        )
    if kind == 0:  # black with faint noise
        return np.clip(np_rng.normal(0, rng.uniform(0, 0.15), (3, 64, 64)), 0, 1).astype(np.float32)
    if kind == 1:  # low-frequency coloured texture
        small = np_rng.uniform(0, rng.uniform(0.1, 0.5), (3, 8, 8)).astype(np.float32)
        return np.kron(small, np.ones((1, 8, 8), dtype=np.float32))
    return render(sample_scene(rng).objects) * rng.uniform(0.05, 0.35)  # faded, off-palette shapes


def training_batch(
    rng: random.Random,
    n: int,
    noise: float = 0.1,
    hard: float = 0.5,
    junk: float = 0.0,
    bank: tuple[np.ndarray, list[Scene]] | None = None,
    bank_frac: float = 0.5,
):
    """n positives and n negatives: (images (2n, 3, 64, 64), captions, labels (2n,)). A positive is a rendered
    scene, or with probability `bank_frac` an image of `bank` (images drawn by a generator from known scenes) with
    its scene's caption. A negative pairs the image with a one-attribute perturbation of its caption (fraction
    `hard`) or another scene's caption; or, with probability `junk`, pairs the caption with a junk image or with
    the scene missing one object."""
    images, captions, labels = [], [], []
    np_rng = np.random.default_rng(rng.randrange(2**31))
    for _ in range(n):
        if bank is not None and rng.random() < bank_frac:
            i = rng.randrange(len(bank[1]))
            img, scene = bank[0][i], bank[1][i]
        else:
            scene = sample_scene(rng)
            img = render(scene.objects)
            img = np.clip(img + np_rng.normal(0, noise * rng.random(), img.shape), 0, 1)
        images.append(img)
        captions.append(scene.caption)
        labels.append(1.0)
        if rng.random() < junk:
            dropped = _drop_one(scene, rng) if rng.random() < 0.5 else None
            images.append(render(dropped) if dropped is not None else _junk(rng, np_rng))
            captions.append(scene.caption)
        else:
            negative = caption(perturb(scene.spec, rng)) if rng.random() < hard else sample_scene(rng).caption
            images.append(img)
            captions.append(negative if negative != scene.caption else caption(perturb(scene.spec, rng)))
        labels.append(0.0)
    return torch.from_numpy(np.stack(images)).float(), captions, torch.tensor(labels)


def train_toy_reward(
    steps: int,
    batch: int,
    seed: int,
    lr: float = 2e-3,
    junk: float = 0.3,
    smooth: float = 1.0,
    bank: tuple[np.ndarray, list[Scene]] | None = None,
    log=print,
) -> ToyReward:
    """BCE on `training_batch` pairs, 70% of batches blurred (generated images are soft-edged); the scorer sees
    its input through a Gaussian blur of `smooth` px."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = ToyReward(smooth=smooth)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        images, captions, labels = training_batch(rng, batch, junk=junk, bank=bank)
        if rng.random() < 0.7:
            images = gaussian_blur(images, rng.uniform(0.5, 2.0))
        loss = F.binary_cross_entropy_with_logits(model.logits(images, captions), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"toy reward step {step}: loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: ToyReward, n: int, seed: int) -> float:
    """Pairwise accuracy on fresh scenes: the true caption scores above its one-attribute negative."""
    images, captions, _ = training_batch(random.Random(seed), n, noise=0.0, hard=1.0)
    s = model(images, captions)
    return float((s[0::2] > s[1::2]).float().mean())


def save_toy_reward(model: ToyReward, path: Path) -> None:
    save_tensors_atomic(dict(model.state_dict()), path)


class ToyEnsemble(torch.nn.Module):
    """Several toy scorers trained from different seeds, combined by mean or min of their logits. A generator
    that exploits one scorer's blind spot is not rewarded by the others (reward-model ensembles curb
    over-optimisation; min is the conservative choice)."""

    def __init__(self, members: list[ToyReward], combine: str):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.combine = combine

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = torch.stack([m(images, prompts) for m in self.members])
        return scores.mean(0) if self.combine == "mean" else scores.amin(0)


def _load_toy_reward(path: str, contrast: int) -> ToyReward:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"reward 'toy': weights file {p} not found; reward.options.path names the safetensors file(s) "
            f"written by bench/train_toy_reward.py (shipped as assets/toy/reward*.safetensors)"
        )
    try:
        weights = load_file(str(p))
        model = ToyReward(dim=weights["embed.weight"].shape[1])  # the width is read from the weights
        model.load_state_dict(weights)
    except Exception as e:  # noqa: BLE001 - safetensors' own error (truncated, garbage), a missing key, a shape
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(
            f"reward 'toy': weights file {p} cannot be loaded ({type(e).__name__}: {first}); restore it or point "
            "reward.options.path at an intact file written by bench/train_toy_reward.py"
        ) from None
    model.contrast = int(contrast)
    return model.eval()


def build_toy_reward(path: str | list[str] | None = None, contrast: int = 0, combine: str = "mean") -> torch.nn.Module:
    """`path`: one weights file, or a list of them (an ensemble combined by `combine`: mean or min)."""
    if not path:
        raise UserError(
            "reward 'toy' needs reward.options.path: the safetensors file(s) written by "
            "bench/train_toy_reward.py (shipped as assets/toy/reward*.safetensors)"
        )
    if combine not in ("mean", "min"):
        raise UserError(f"reward 'toy': combine must be 'mean' or 'min', got {combine!r}")
    if isinstance(path, str):
        return _load_toy_reward(path, contrast)
    return ToyEnsemble([_load_toy_reward(p, contrast) for p in path], combine)

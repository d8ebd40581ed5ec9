"""`colour`: how close an image's pixels are to the colour named in its prompt. The tiny default's reward.

r = 1 - mean_pixels ||rgb - c|| / sqrt(3), in [0, 1]; differentiable in the pixels.
"""

from __future__ import annotations

import re

import torch

from leapalign_fast.errors import UserError

PALETTE = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "orange": (1.0, 0.55, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.6, 0.75),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "cyan": (0.0, 1.0, 1.0),
    "brown": (0.55, 0.27, 0.07),
}


def prompt_colour(prompt: str) -> tuple[float, float, float]:
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in PALETTE:
            return PALETTE[word]
    raise UserError(
        f"reward 'colour' needs a colour word in every prompt; '{prompt}' has none "
        f"(known: {', '.join(PALETTE)}); fix the prompt file or pick another reward"
    )


class ColourReward(torch.nn.Module):
    def check_prompts(self, prompts: list[str]) -> None:
        for p in prompts:
            prompt_colour(p)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"colour reward expects images (B, 3, H, W), got {tuple(images.shape)}")
        target = torch.tensor([prompt_colour(p) for p in prompts], device=images.device, dtype=images.dtype)
        dist = (images - target[:, :, None, None]).square().sum(dim=1).add(1e-8).sqrt()  # (B, H, W)
        return 1.0 - dist.mean(dim=(1, 2)) / 3**0.5


def build_colour_reward() -> torch.nn.Module:
    return ColourReward()

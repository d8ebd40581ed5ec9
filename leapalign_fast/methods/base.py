"""What every method's loss builder receives and returns, and the shared index draw."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from leapalign_fast.errors import UserError
from leapalign_fast.flow import Velocity


@dataclass
class StepInputs:
    velocity: Velocity  # v(x, t) of the trained model; grad-enabled unless under no_grad
    noise: torch.Tensor  # (B, L, C) packed latents at t = 1
    sigmas: torch.Tensor  # (N + 1,) schedule, 1 ... 0
    decode: Callable[[torch.Tensor], torch.Tensor]  # packed latents -> images (B, 3, H, W) in [0, 1]
    reward: Callable[[torch.Tensor, list[str]], torch.Tensor]  # (images, prompts) -> (B,)
    prompts: list[str]
    generator: torch.Generator  # CPU generator for the method's random draws (step indices)


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, carries the gradient
    reward: torch.Tensor  # (B,) reward of the real sampled image, detached
    metrics: dict[str, float] = field(default_factory=dict)
    x0: torch.Tensor | None = None  # (B, L, C) final latents, detached (for logging)


def resolve_window(window: list[int], num_steps: int) -> tuple[int, int]:
    """`[lo, hi)` trajectory-index window for (k, j); empty means the whole range [0, N)."""
    lo, hi = (0, num_steps) if len(window) == 0 else (tuple(window) + (None,))[:2]
    if len(window) not in (0, 2) or hi is None or not (0 <= lo < hi <= num_steps) or hi - lo < 2:
        raise UserError(
            f"method.index_window={list(window)} must be [] (whole trajectory) or [lo, hi) with "
            f"0 <= lo, lo + 2 <= hi <= num_steps={num_steps}; e.g. [0, {num_steps}]"
        )
    return lo, hi


def draw_two_indices(lo: int, hi: int, generator: torch.Generator) -> tuple[int, int]:
    """Two distinct trajectory indices a < b drawn uniformly from [lo, hi): t_a = k > t_b = j."""
    a, b = (lo + torch.randperm(hi - lo, generator=generator)[:2]).tolist()
    return min(a, b), max(a, b)

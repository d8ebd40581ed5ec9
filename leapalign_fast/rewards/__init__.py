"""Differentiable rewards behind one interface, registered by name.

A reward is a frozen `torch.nn.Module` called as `reward(images, prompts) -> (B,)` with images
float (B, 3, H, W) in [0, 1]; gradients flow to the pixels, never to the reward's own weights.
"""

from __future__ import annotations

import difflib
from typing import Callable

import torch

from leapalign_fast.errors import UserError

_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {}


def register_reward(name: str):
    """Decorator: `@register_reward("colour")` on a builder `(**options) -> nn.Module`."""

    def wrap(builder):
        _REGISTRY[name] = builder
        return builder

    return wrap


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def build_reward(name: str, **options) -> torch.nn.Module:
    """Build a registered reward, frozen (eval mode, requires_grad False)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown reward '{name}'; known rewards: {', '.join(reward_names())}.{hint}")
    model = _REGISTRY[name](**options)
    model.eval().requires_grad_(False)
    return model


from leapalign_fast.rewards import colour  # noqa: E402,F401  (registers built-in rewards)

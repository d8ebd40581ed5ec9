"""Differentiable rewards behind one interface, registered by name.

A reward is a frozen `torch.nn.Module` called as `reward(images, prompts) -> (B,)` with images
float (B, 3, H, W) in [0, 1]; gradients flow to the pixels, never to the reward's own weights.
"""

from __future__ import annotations

import difflib
import inspect
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


class WeightedSum(torch.nn.Module):
    """`sum_i w_i r_i(images, prompts)`: a mixture such as "hpsv2.1:1.0,pickscore:0.5"."""

    def __init__(self, parts: dict[str, tuple[float, torch.nn.Module]]):
        super().__init__()
        self.weights = {n: w for n, (w, _) in parts.items()}
        self.parts = torch.nn.ModuleDict({n.replace(".", "_"): m for n, (_, m) in parts.items()})

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(w * self.parts[n.replace(".", "_")](images, prompts) for n, w in self.weights.items())


def parse_mixture(spec: str) -> dict[str, float]:
    """"a:1.0,b:0.5" -> {"a": 1.0, "b": 0.5}; a bare name has weight 1."""
    out = {}
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"reward '{spec}': weight '{weight}' of '{name}' is not a number; write name:weight") from None
    return out


def check_reward_name(name: str) -> None:
    """Raise the unknown-reward error now (before any model is loaded) if `name` or a part of a mixture is unknown."""
    for part in parse_mixture(name) if ("," in name or ":" in name) else [name]:
        if part not in _REGISTRY:
            close = difflib.get_close_matches(part, _REGISTRY, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown reward '{part}'; known rewards: {', '.join(reward_names())}.{hint}")


def build_reward(name: str, **options) -> torch.nn.Module:
    """Build a registered reward (or a weighted mixture "a:1,b:0.5", options per part as tables named by part),
    frozen (eval mode, requires_grad False)."""
    if "," in name or ":" in name:
        parts = {}
        for part, weight in parse_mixture(name).items():
            opts = options.get(part, {})
            if not isinstance(opts, dict):
                raise UserError(f"reward.options.{part} must be a table of that reward's options")
            parts[part] = (weight, build_reward(part, **opts))
        return WeightedSum(parts).eval().requires_grad_(False)
    check_reward_name(name)
    builder = _REGISTRY[name]
    try:
        inspect.signature(builder).bind(**options)
    except TypeError as e:  # an option the builder does not take
        raise UserError(f"reward '{name}': bad reward.options ({e}); see the reward's documentation") from None
    model = builder(**options)
    model.eval().requires_grad_(False)
    return model


from leapalign_fast.rewards import clip_rewards, colour, imagereward  # noqa: E402,F401  (registers built-in rewards)
from leapalign_fast.toy import reward as _toy_reward  # noqa: E402,F401  (registers 'toy')

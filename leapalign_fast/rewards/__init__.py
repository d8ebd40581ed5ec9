"""Differentiable rewards behind one interface, registered by name.

A reward is a frozen `torch.nn.Module` called as `reward(images, prompts) -> (B,)` with images
float (B, 3, H, W) in [0, 1]; gradients flow to the pixels, never to the reward's own weights.

The built-in rewards are named in `REWARDS` by the module path of their builder and imported on first use (as the
backbones in models/backbone.py): a reward module imports nothing from this registry, so the dependency points one
way (no rewards <-> toy circle), and a run imports only the reward it uses.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Callable

import torch

from leapalign_fast.errors import UserError

# name -> "module:builder", a builder `(**options) -> nn.Module`.
REWARDS = {
    "clip": "leapalign_fast.rewards.clip_rewards:build_clip",
    "pickscore": "leapalign_fast.rewards.clip_rewards:build_pickscore",
    "hpsv2.1": "leapalign_fast.rewards.clip_rewards:build_hpsv21",
    "aesthetic": "leapalign_fast.rewards.clip_rewards:build_aesthetic",
    "imagereward": "leapalign_fast.rewards.imagereward:build_imagereward",
    "colour": "leapalign_fast.rewards.colour:build_colour_reward",
    "toy": "leapalign_fast.toy.reward:build_toy_reward",
    "fade": "leapalign_fast.rewards.video:build_fade_reward",  # toy video reward: last frame brighter than the first
}
_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {}  # builders registered at run time (register_reward)


def register_reward(name: str):
    """Decorator: `@register_reward("mine")` on a builder `(**options) -> nn.Module` defined outside the package
    (a plug-in, a test); the built-in rewards are listed in `REWARDS`."""

    def wrap(builder):
        _REGISTRY[name] = builder
        return builder

    return wrap


def reward_names() -> list[str]:
    return sorted({*REWARDS, *_REGISTRY})


def _builder(name: str) -> Callable[..., torch.nn.Module]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    module, _, attr = REWARDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


class WeightedSum(torch.nn.Module):
    """`sum_i w_i r_i(images, prompts)`: a mixture such as "hpsv2.1:1.0,pickscore:0.5"."""

    def __init__(self, parts: dict[str, tuple[float, torch.nn.Module]]):
        super().__init__()
        self.weights = {n: w for n, (w, _) in parts.items()}
        self.parts = torch.nn.ModuleDict({n.replace(".", "_"): m for n, (_, m) in parts.items()})

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(w * self.parts[n.replace(".", "_")](images, prompts) for n, w in self.weights.items())


def parse_mixture(spec: str) -> dict[str, float]:
    """ "a:1.0,b:0.5" -> {"a": 1.0, "b": 0.5}; a bare name has weight 1."""
    out = {}
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(
                f"reward '{spec}': weight '{weight}' of '{name}' is not a number; write name:weight"
            ) from None
    return out


def check_reward_name(name: str) -> None:
    """Raise the unknown-reward error now (before any model is loaded) if `name` or a part of a mixture is unknown."""
    for part in parse_mixture(name) if ("," in name or ":" in name) else [name]:
        if part not in _REGISTRY and part not in REWARDS:
            close = difflib.get_close_matches(part, reward_names(), n=1)
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
    builder = _builder(name)
    try:
        inspect.signature(builder).bind(**options)
    except TypeError as e:  # an option the builder does not take
        raise UserError(f"reward '{name}': bad reward.options ({e}); see the reward's documentation") from None
    model = builder(**options)
    model.eval().requires_grad_(False)
    return model

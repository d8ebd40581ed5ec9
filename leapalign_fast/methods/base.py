"""What every method receives and returns, its settings base class and registry entry, and shared pieces:
the hinge objective, the no-grad prefix, value-preserving gradient scaling, and the index window."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from leapalign_fast.flow import Velocity
from leapalign_fast.methods.settings import MethodSettings
from leapalign_fast.sampler import sample_trajectory


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
    reward: torch.Tensor  # (B,) reward of the image the loss scores, detached
    metrics: dict[str, float] = field(default_factory=dict)
    x0: torch.Tensor | None = None  # (B, L, C) final latents, detached (for logging)


@dataclass(frozen=True)
class MethodSpec:
    """One loss module's entry: its settings dataclass (methods/settings.py) and its loss builder."""

    settings: type[MethodSettings]
    loss: Callable[[StepInputs, MethodSettings], StepOutput]

    @property
    def name(self) -> str:
        return self.settings.__dataclass_fields__["name"].default

    @property
    def reference(self) -> bool:
        return self.settings.reference


def hinge(inp: StepInputs, x0: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean max(0, lam - r(decode(x0))), r) with r (B,)."""
    r = inp.reward(inp.decode(x0), inp.prompts)
    return torch.relu(lam - r).mean(), r


def prefix_state(inp: StepInputs, stop: int) -> torch.Tensor:
    """The detached state at index `stop`, sampled without grad."""
    return sample_trajectory(inp.velocity, inp.noise, inp.sigmas[: stop + 1]).x0


class _Pullback(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g)
        ctx.dtype = x.dtype
        return x.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (g,) = ctx.saved_tensors
        return (g * grad).to(ctx.dtype), None


def pullback(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A scalar of value exactly 0 whose gradient w.r.t. `x` is `g` (times the incoming scale): adding it to a
    loss computed elsewhere sends that loss's gradient `g = dloss/dx`, found earlier, back through x's graph."""
    if g.shape != x.shape:
        raise ValueError(f"pullback: gradient shape {tuple(g.shape)} != tensor shape {tuple(x.shape)}")
    return _Pullback.apply(x, g.detach())


def grad_only(v: torch.Tensor) -> torch.Tensor:
    """`v - sg(v)`: value exactly 0, gradient of v. Adding it to a real state keeps the state's value bit-exact."""
    return v - v.detach()


def scale_grad(v: torch.Tensor, factor: float) -> torch.Tensor:
    """Value v (exactly), gradient scaled by `factor`: `sg(v) + factor (v - sg(v))`."""
    return v if factor == 1.0 else v.detach() + factor * grad_only(v)


def draw_two_indices(lo: int, hi: int, generator: torch.Generator) -> tuple[int, int]:
    """Two distinct trajectory indices a < b drawn uniformly from [lo, hi): t_a = k > t_b = j."""
    a, b = (lo + torch.randperm(hi - lo, generator=generator)[:2]).tolist()
    return min(a, b), max(a, b)

"""What every method receives and returns, its settings base class and registry entry, and shared pieces:
the hinge objective, the no-grad prefix, value-preserving gradient scaling, and the index window."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from leapalign_fast.errors import UserError
from leapalign_fast.flow import Velocity
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


@dataclass
class MethodSettings:
    """The `[method]` table: `name` picks the method; each method subclasses this with its own keys."""

    name: str = ""
    lam: float = 1.0  # hinge margin: loss = max(0, lam - reward)

    def validate(self, num_steps: int) -> None:
        """Raise UserError naming `method.<key>` for a bad value (only this method's keys)."""

    def grad_graphs(self, num_steps: int) -> int:
        """Upper bound on the grad-enabled velocity forwards one sample keeps for the backward (memory preflight)."""
        return 2

    def grad_decodes(self) -> int:
        """Decodes (and reward forwards) one sample keeps for the backward."""
        return 1

    def decode_apart(self) -> bool:
        """True when the decode + reward backward is over before the grad forwards run (their graphs never
        coexist: the step needs the larger of the two, not the sum)."""
        return False

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry: a method's name, its settings dataclass and its loss builder."""

    name: str
    settings: type[MethodSettings]
    loss: Callable[[StepInputs, MethodSettings], StepOutput]
    reference: bool = False  # a memory/throughput reference, not an alignment method (bench/quality.py skips it)


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


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


def resolve_window(window: list[int], num_steps: int, min_span: int = 2) -> tuple[int, int]:
    """`[lo, hi)` trajectory-index window for (k, j); empty means the whole range [0, N)."""
    if num_steps < min_span:
        raise UserError(f"num_steps={num_steps} is too few for this method's (k, j) draw: it needs num_steps >= "
                        f"{min_span}")  # fmt: skip
    lo, hi = (0, num_steps) if len(window) == 0 else (tuple(window) + (None,))[:2]
    if len(window) not in (0, 2) or hi is None or not (0 <= lo < hi <= num_steps) or hi - lo < min_span:
        raise UserError(
            f"method.index_window={list(window)} must be [] (whole trajectory) or [lo, hi) with "
            f"0 <= lo, lo + {min_span} <= hi <= num_steps={num_steps}; e.g. [0, {num_steps}]"
        )
    return lo, hi


def draw_two_indices(lo: int, hi: int, generator: torch.Generator) -> tuple[int, int]:
    """Two distinct trajectory indices a < b drawn uniformly from [lo, hi): t_a = k > t_b = j."""
    a, b = (lo + torch.randperm(hi - lo, generator=generator)[:2]).tolist()
    return min(a, b), max(a, b)

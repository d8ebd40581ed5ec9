"""The shared Euler sampler: one trajectory `x_{t_0} = noise -> ... -> x_{t_N} = x_0`, without grad.

Methods that train inside the loop pass a `step_hook(i, x_i)` that may run the model itself (with grad)
at chosen steps; the value it returns drives the trajectory exactly as the no-grad forward would have,
so the model is called once per step either way.

Every step is the diffusers scheduler's (`flow.scheduler_step`): in the model dtype (bf16 included) a trajectory
from the same noise and velocity is the family's pipeline's, bit for bit where the velocity is (tests/test_backbones.py,
tests/test_fast_path.py); training's rollouts are the samples evaluation and grids draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from leapalign_fast.flow import Velocity, as_batch_time, scheduler_step

StepHook = Callable[[int, torch.Tensor], "torch.Tensor | None"]  # (i, x_i) -> v_i (maybe with grad) or None


@dataclass
class Trajectory:
    sigmas: torch.Tensor  # (N + 1,) times, t_0 = 1 ... t_N = 0
    states: list[torch.Tensor] | None  # N + 1 detached states x_{t_i}, if kept
    x0: torch.Tensor  # (B, L, C) final state, detached


def sample_trajectory(
    velocity: Velocity,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    step_hook: StepHook | None = None,
    keep_states: bool = False,
) -> Trajectory:
    """Euler-integrate `velocity` from `noise` (at t = sigmas[0]) to t = sigmas[-1] = 0.

    The schedule moves to the latents' device once, so the steps make no host copies or syncs."""
    x = noise.detach()
    sigmas = sigmas.to(x.device)
    states = [x] if keep_states else None
    for i in range(len(sigmas) - 1):
        t = as_batch_time(sigmas[i], x)
        v = step_hook(i, x) if step_hook is not None else None
        if v is None:
            with torch.no_grad():
                v = velocity(x, t)
        x = scheduler_step(x, v.detach(), sigmas[i], sigmas[i + 1])
        if states is not None:
            states.append(x)
    return Trajectory(sigmas, states, x)


def integrate_with_grad(
    velocity: Velocity,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    start: int,
    stop: int,
    trained: set[int] | None = None,
    stop_input_grad: bool = False,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Euler steps `start -> stop` whose chain keeps the autograd graph (for backprop-through-sampling baselines).

    At indices in `trained` (default: all) the model runs with grad, on `sg(x)` if `stop_input_grad` (DRTune);
    elsewhere it runs without grad, and `x_s = x_t - dt v` still passes x's gradient through the identity term.
    `checkpoint` recomputes each trained forward in the backward instead of keeping its activations.
    """
    sigmas = sigmas.to(x.device)  # once, not a host copy per step
    for i in range(start, stop):
        t = as_batch_time(sigmas[i], x)
        if trained is None or i in trained:
            x_in = x.detach() if stop_input_grad else x
            if checkpoint:
                v = torch.utils.checkpoint.checkpoint(velocity, x_in, t, use_reentrant=False)
            else:
                v = velocity(x_in, t)
        else:
            with torch.no_grad():
                v = velocity(x.detach(), t)
        x = scheduler_step(x, v, sigmas[i], sigmas[i + 1])
    return x

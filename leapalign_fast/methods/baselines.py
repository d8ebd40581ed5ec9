"""Direct-gradient baselines on the shared sampler, each one loss builder with LeapAlign's hinge objective
`max(0, lam - r)` on the reward of the image it differentiates (the same harness, sampler and rewards).

- ReFL (Xu et al., ImageReward, NeurIPS 2023): no-grad sampling to a random late step t, one grad forward,
  reward on the one-step prediction `x_t - t v(x_t, t)`.
- DRaFT-K (Clark et al., arXiv 2309.17400): backprop through the last K sampling steps (K = 1: DRaFT-1).
- DRaFT-LV (same paper): the last step with grad, plus n re-noisings `(1 - s) x_0 + s eps` of the detached
  x_0 at the last step's time s, each predicted back `x_s - s v(x_s, s)` with grad; losses averaged.
- DRTune (Wu et al., ECCV 2024): every trained step feeds `sg(x_t)` to the model while the Euler chain keeps
  grad, over a sparse random set of trained steps; no nested (input-Jacobian) terms.
- full: all N steps with grad (optionally with activation checkpointing): the memory reference.
"""

from __future__ import annotations

import torch

from leapalign_fast.flow import as_batch_time, euler_step
from leapalign_fast.methods.base import StepInputs, StepOutput
from leapalign_fast.sampler import integrate_with_grad, sample_trajectory


def _hinge(inp: StepInputs, x0: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    r = inp.reward(inp.decode(x0), inp.prompts)
    return torch.relu(lam - r).mean(), r


def _prefix(inp: StepInputs, stop: int) -> torch.Tensor:
    """The detached state at index `stop`, sampled without grad."""
    traj = sample_trajectory(inp.velocity, inp.noise, inp.sigmas[: stop + 1])
    return traj.x0


def refl_loss(inp: StepInputs, lam: float, late_steps: int) -> StepOutput:
    n = len(inp.sigmas) - 1
    i = n - 1 - int(torch.randint(late_steps, (1,), generator=inp.generator))  # one of the last `late_steps`
    x_t = _prefix(inp, i)
    t = inp.sigmas[i]
    x0_pred = euler_step(x_t, inp.velocity(x_t, as_batch_time(t, x_t)), t, 0.0)  # one-step prediction
    loss, r = _hinge(inp, x0_pred, lam)
    return StepOutput(loss, r.detach(), {"t": float(t)}, x0_pred.detach())


def draft_loss(inp: StepInputs, lam: float, k: int, checkpoint: bool = False) -> StepOutput:
    n = len(inp.sigmas) - 1
    x = _prefix(inp, n - k)
    x0 = integrate_with_grad(inp.velocity, x, inp.sigmas, n - k, n, checkpoint=checkpoint)
    loss, r = _hinge(inp, x0, lam)
    return StepOutput(loss, r.detach(), {"k": float(k)}, x0.detach())


def draft_lv_loss(inp: StepInputs, lam: float, n_renoise: int) -> StepOutput:
    n = len(inp.sigmas) - 1
    x = _prefix(inp, n - 1)
    x0 = integrate_with_grad(inp.velocity, x, inp.sigmas, n - 1, n)  # the last step, with grad
    s = inp.sigmas[n - 1]
    base = x0.detach()
    preds = [x0]
    for _ in range(n_renoise):
        eps = torch.randn(base.shape, generator=inp.generator).to(base.device, base.dtype)
        x_s = (1.0 - s) * base + s * eps
        preds.append(euler_step(x_s, inp.velocity(x_s, as_batch_time(s, x_s)), s, 0.0))
    losses, rewards = zip(*(_hinge(inp, p, lam) for p in preds))
    return StepOutput(torch.stack(losses).mean(), rewards[0].detach(), {"renoise": float(n_renoise)}, base)


def drtune_loss(inp: StepInputs, lam: float, trained_steps: int, window: tuple[int, int]) -> StepOutput:
    lo, hi = window
    picks = (lo + torch.randperm(hi - lo, generator=inp.generator)[:trained_steps]).tolist()
    n = len(inp.sigmas) - 1
    x0 = integrate_with_grad(inp.velocity, inp.noise.detach(), inp.sigmas, 0, n, trained=set(picks),
                             stop_input_grad=True)  # fmt: skip
    loss, r = _hinge(inp, x0, lam)
    return StepOutput(loss, r.detach(), {"trained": float(len(picks))}, x0.detach())


def full_loss(inp: StepInputs, lam: float, checkpoint: bool) -> StepOutput:
    n = len(inp.sigmas) - 1
    x0 = integrate_with_grad(inp.velocity, inp.noise.detach(), inp.sigmas, 0, n, checkpoint=checkpoint)
    loss, r = _hinge(inp, x0, lam)
    return StepOutput(loss, r.detach(), {}, x0.detach())

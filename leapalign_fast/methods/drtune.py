"""DRTune (Wu et al., "Deep Reward Supervisions for Tuning Text-to-Image Diffusion Models", ECCV 2024): every
trained step feeds `sg(x_t)` to the model while the Euler chain keeps grad, so there are no nested
(input-Jacobian) terms; only a sparse set of steps is trained.

`variant = "published"` (default; FlowBP's FLUX.1 setting `num_train_steps = 3`, `early_stop_ratio = 0.4`):
an early-stop index e is drawn uniformly from the last round(early_stop_fraction * N) steps, the rollout stops
there, and the reward scores the one-step prediction `x_e - t_e v(sg(x_e), t_e)`; the K trained steps are equally
spaced in [0, e] with stride floor((e + 1) / K) and a uniformly drawn offset. So

    d x0_pred / d theta = -sum_{i in T, i < e} (t_i - t_{i+1}) dv(x_i)/dtheta - [e in T] t_e dv(x_e)/dtheta.

`variant = "uniform"` (this project's earlier default): K steps drawn uniformly from `index_window`, the full
rollout, and the reward on the real x_0.
"""

from __future__ import annotations

import torch

from leapalign_fast.flow import as_batch_time, euler_step
from leapalign_fast.methods.base import MethodSpec, StepInputs, StepOutput, hinge
from leapalign_fast.methods.settings import DRTuneSettings, resolve_window
from leapalign_fast.sampler import integrate_with_grad


def draw_early_stop(num_steps: int, fraction: float, generator: torch.Generator) -> int:
    """e = N - r with r uniform in [1, round(fraction * N)]; N - 1 (no early stop) when that count is 0."""
    m = min(round(num_steps * fraction), num_steps)
    return num_steps - 1 if m <= 0 else num_steps - int(torch.randint(1, m + 1, (1,), generator=generator))


def draw_equally_spaced(total: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` indices `start + i * stride` in [0, total), stride = total // count, start uniform."""
    count = min(count, total)
    if count == total:
        return list(range(total))
    stride = max(1, total // count)
    if total - 1 - (count - 1) * stride < 0:  # only for count > total // 2 with a remainder: tighten the stride
        stride = max(1, (total - 1) // max(1, count - 1))
    start = int(torch.randint(0, max(0, total - 1 - (count - 1) * stride) + 1, (1,), generator=generator))
    return [start + i * stride for i in range(count)]


def drtune_loss(inp: StepInputs, s: DRTuneSettings) -> StepOutput:
    n = len(inp.sigmas) - 1
    if s.variant == "uniform":
        lo, hi = resolve_window(s.index_window, n, min_span=1)
        picks = (lo + torch.randperm(hi - lo, generator=inp.generator)[: s.drtune_steps]).tolist()
        x0 = integrate_with_grad(
            inp.velocity, inp.noise.detach(), inp.sigmas, 0, n, trained=set(picks), stop_input_grad=True
        )
        loss, r = hinge(inp, x0, s.lam)
        return StepOutput(
            loss, r.detach(), {"trained": float(len(picks)), "grad_forwards": float(len(picks))}, x0.detach()
        )
    e = draw_early_stop(n, s.early_stop_fraction, inp.generator)
    picks = draw_equally_spaced(e + 1, s.drtune_steps, inp.generator)
    x_e = integrate_with_grad(
        inp.velocity, inp.noise.detach(), inp.sigmas, 0, e, trained=set(picks), stop_input_grad=True
    )
    t_e = as_batch_time(inp.sigmas[e], x_e)
    if e in picks:
        v_e = inp.velocity(x_e.detach(), t_e)
    else:
        with torch.no_grad():
            v_e = inp.velocity(x_e.detach(), t_e)
    x0_pred = euler_step(x_e, v_e, inp.sigmas[e], 0.0)  # the one-step prediction from x_e; the rollout stops here
    loss, r = hinge(inp, x0_pred, s.lam)
    metrics = {
        "early_stop": float(e),
        "t": float(inp.sigmas[e]),
        "trained": float(len(picks)),
        "grad_forwards": float(len(picks)),
        "model_calls": float(e + 1),
    }
    return StepOutput(loss, r.detach(), metrics, x0_pred.detach())


METHOD = MethodSpec(DRTuneSettings, drtune_loss)

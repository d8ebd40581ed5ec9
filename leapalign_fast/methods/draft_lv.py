"""DRaFT-LV (Clark et al., arXiv 2309.17400): the last step with grad, plus n re-noisings `(1 - s) x_0 + s eps` of
the detached x_0 at the last step's time s, each predicted back `x_s - s v(x_s, s)` with grad; losses averaged.
Published FLUX.1 setting (FlowBP's `draft_lv.num_noised_samples`): n = 2."""

from __future__ import annotations

import torch

from leapalign_fast.flow import as_batch_time, euler_step
from leapalign_fast.methods.base import MethodSpec, StepInputs, StepOutput, hinge, prefix_state
from leapalign_fast.methods.settings import DraftLVSettings
from leapalign_fast.sampler import integrate_with_grad


def draft_lv_loss(inp: StepInputs, s: DraftLVSettings) -> StepOutput:
    n = len(inp.sigmas) - 1
    x = prefix_state(inp, n - 1)
    x0 = integrate_with_grad(inp.velocity, x, inp.sigmas, n - 1, n)  # the last step, with grad
    t = inp.sigmas[n - 1]
    base = x0.detach()
    preds = [x0]
    for _ in range(s.renoise):
        eps = torch.randn(base.shape, generator=inp.generator).to(base.device, base.dtype)
        x_t = (1.0 - t) * base + t * eps
        preds.append(euler_step(x_t, inp.velocity(x_t, as_batch_time(t, x_t)), t, 0.0))
    losses, rewards = zip(*(hinge(inp, p, s.lam) for p in preds))
    metrics = {"renoise": float(s.renoise), "grad_forwards": float(1 + s.renoise)}
    return StepOutput(torch.stack(losses).mean(), rewards[0].detach(), metrics, base)


METHOD = MethodSpec(DraftLVSettings, draft_lv_loss)

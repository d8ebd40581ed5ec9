"""ReFL (Xu et al., ImageReward, NeurIPS 2023): no-grad sampling to a random late step t, one grad forward,
reward on the one-step prediction `x_t - t v(x_t, t)`; loss `max(0, lam - r)`.

Published FLUX.1 setting (FlowBP's `refl.last_n_steps = 11` at N = 25): t is one of the last 11 of 25 steps
(t 0.07-0.60). The count scales with N as `round(late_fraction * N)`; `late_steps` > 0 fixes it instead
(this project's earlier default was `late_steps = 2`).
"""

from __future__ import annotations

import torch

from leapalign_fast.flow import as_batch_time, euler_step
from leapalign_fast.methods.base import MethodSpec, StepInputs, StepOutput, hinge, prefix_state
from leapalign_fast.methods.settings import ReFLSettings


def refl_loss(inp: StepInputs, s: ReFLSettings) -> StepOutput:
    n = len(inp.sigmas) - 1
    i = n - 1 - int(torch.randint(s.count(n), (1,), generator=inp.generator))  # one of the last count(n) steps
    x_t = prefix_state(inp, i)
    t = inp.sigmas[i]
    x0_pred = euler_step(x_t, inp.velocity(x_t, as_batch_time(t, x_t)), t, 0.0)  # one-step prediction
    loss, r = hinge(inp, x0_pred, s.lam)
    return StepOutput(loss, r.detach(), {"t": float(t), "grad_forwards": 1.0}, x0_pred.detach())


METHOD = MethodSpec(ReFLSettings, refl_loss)

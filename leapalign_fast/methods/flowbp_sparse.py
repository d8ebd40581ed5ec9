"""FlowBP-Sparse (arXiv 2606.11075): K active steps, each with the Euler weight of its own step, and the reward on
the real x_0; no bridge, no nested term, no similarity weight.

The rollout is the sampler's own: at the K active indices S (drawn without replacement, P(i) ~ (i + 1)^late_bias)
the model runs with grad on the detached state, and `x_0' = x_0 + sum_{i in S} -(t_i - t_{i+1}) f (v_i - sg(v_i))`
has the value of the real x_0 and the gradient

    d x_0' / d theta = -f sum_{i in S} (t_i - t_{i+1}) dv(x_i, t_i)/dtheta,

with f = 1 + grad_rescale (sum_i (t_i - t_{i+1}) / sum_{i in S} (t_i - t_{i+1}) - 1) (f = 1 at grad_rescale 0;
at 1 the active steps carry the whole trajectory's Euler weight). FlowBP re-forwards the K steps after a cached
rollout; here the K forwards are the trajectory's own (N model calls, K with grad, no re-forward). Loss
`max(0, lam - r(decode(x_0')))`. Published FLUX.1 setting: K = 3, late_bias 2, grad_rescale 1, batch 4 per GPU.
"""

from __future__ import annotations

import torch

from leapalign_fast.flow import as_batch_time
from leapalign_fast.methods.base import MethodSpec, StepInputs, StepOutput, grad_only, hinge
from leapalign_fast.methods.indices import draw_late_biased, rescale_factor
from leapalign_fast.methods.settings import SparseSettings
from leapalign_fast.sampler import sample_trajectory


def step_weights(sigmas: torch.Tensor) -> dict[int, float]:
    """{i: t_i - t_{i+1}}: each step's Euler weight (positive)."""
    return dict(enumerate((sigmas[:-1] - sigmas[1:]).tolist()))  # one host sync on the (N + 1,) schedule


def sparse_loss(inp: StepInputs, s: SparseSettings) -> StepOutput:
    n = len(inp.sigmas) - 1
    active = draw_late_biased(0, n, s.num_active_steps, s.late_bias, inp.generator)
    dt = step_weights(inp.sigmas)
    f = rescale_factor(dt, active, s.grad_rescale)
    terms: list[torch.Tensor] = []
    acc = torch.promote_types(inp.noise.dtype, torch.float32)  # the Euler sums in at least float32

    def grad_forwards(i: int, x: torch.Tensor) -> torch.Tensor | None:
        if i not in active:
            return None
        v = inp.velocity(x, as_batch_time(inp.sigmas[i], x))  # grad on, input detached: the trajectory's own step
        terms.append((-dt[i] * f) * grad_only(v.to(acc)))  # value 0, gradient of this step's Euler term
        return v

    traj = sample_trajectory(inp.velocity, inp.noise, inp.sigmas, step_hook=grad_forwards)
    x0 = (traj.x0.to(acc) + torch.stack(terms).sum(0)).to(traj.x0.dtype)  # value == real x_0
    loss, r = hinge(inp, x0, s.lam)
    metrics = {
        "grad_forwards": float(len(active)),
        "reforwards": 0.0,
        "grad_rescale_factor": f,
        "active_mean_idx": sum(active) / len(active),
    }
    return StepOutput(loss, r.detach(), metrics, traj.x0)


METHOD = MethodSpec(SparseSettings, sparse_loss)

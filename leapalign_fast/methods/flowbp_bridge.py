"""FlowBP-Bridge (arXiv 2606.11075): FlowBP-Sparse's active steps split at a bridge index j, with one nested
cross-step gradient path through x_j scaled by alpha; reward on the real x_0, no similarity weight.

j is the later index of a (k, j) pair from the index sampler (k itself is not used). The K active steps are split
between [0, j) ("pre", P) and [j, N) ("post", Q) in proportion to their lengths, at least one each; Q always holds
j, the others are late-biased draws (P(i) ~ (i - start + 1)^late_bias within each segment). With Euler weights
dt_i = t_i - t_{i+1} and the rescale factor f of FlowBP-Sparse over all K active steps:

    x_j' = x_j + sum_{i in P} -f dt_i (v_i - sg v_i)        value x_j, the pre-j gradient
    u_j  = x_j + alpha (x_j' - x_j)                        value x_j, that gradient scaled by alpha
    x_0' = x_0 + (x_j' - x_j) + sum_{i in Q} -f dt_i (v_i - sg v_i),   v_j = v(u_j, t_j)

so d x_0'/d theta = -f sum_{P u Q} dt_i dv_i/dtheta + alpha f^2 dt_j dv_j/dx . sum_{P} dt_i dv_i/dtheta.
Every grad forward is the trajectory's own step (N model calls, K with grad, no re-forward): all of P comes before
j, and v(u_j) equals v(x_j) in value. Published FLUX.1 setting: K = 5, late_bias 2, grad_rescale 1, alpha 0.1,
uniform (k, j), batch 8 per GPU.
"""

from __future__ import annotations

import torch

from leapalign_fast.flow import as_batch_time
from leapalign_fast.methods.base import MethodSpec, StepInputs, StepOutput, grad_only, hinge
from leapalign_fast.methods.flowbp_sparse import step_weights
from leapalign_fast.methods.indices import draw_late_biased, draw_pair, rescale_factor
from leapalign_fast.methods.settings import BridgeSettings
from leapalign_fast.sampler import sample_trajectory


def split_active(total: int, pre_len: int, post_len: int) -> tuple[int, int]:
    """K active steps split in proportion to the segment lengths, at least one each, at most each length."""
    total = min(total, pre_len + post_len)
    pre = min(max(round(total * pre_len / (pre_len + post_len)), 1), pre_len)
    post = min(max(total - pre, 1), post_len)
    pre = min(max(total - post, 1), pre_len)
    return pre, post


def draw_bridge(n: int, j: int, s: BridgeSettings, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(P, Q): the active steps before j, and j with the active steps after it."""
    n_pre, n_post = split_active(s.num_active_steps, j, n - j)
    pre = draw_late_biased(0, j, n_pre, s.late_bias, generator)
    post = [j] + (draw_late_biased(j + 1, n, n_post - 1, s.late_bias, generator) if n_post > 1 else [])
    return pre, post


def bridge_loss(inp: StepInputs, s: BridgeSettings) -> StepOutput:
    n = len(inp.sigmas) - 1
    _, j = draw_pair(s, n, inp.generator)
    pre, post = draw_bridge(n, j, s, inp.generator)
    dt = step_weights(inp.sigmas)
    f = rescale_factor(dt, pre + post, s.grad_rescale)
    acc = torch.promote_types(inp.noise.dtype, torch.float32)  # the Euler sums in at least float32
    pre_terms: list[torch.Tensor] = []
    post_terms: list[torch.Tensor] = []

    def grad_forwards(i: int, x: torch.Tensor) -> torch.Tensor | None:
        t = as_batch_time(inp.sigmas[i], x)
        if i == j:
            g_j = torch.stack(pre_terms).sum(0)  # value 0: the gradient of x_j' = x_j + g_j
            u_j = (x.to(acc) + s.alpha * g_j).to(x.dtype)  # value x_j, pre-j gradient scaled by alpha
            v = inp.velocity(u_j, t)
            post_terms.extend([g_j, (-dt[i] * f) * grad_only(v.to(acc))])
            return v
        if i in pre or i in post:
            v = inp.velocity(x, t)  # grad on, input detached
            (pre_terms if i < j else post_terms).append((-dt[i] * f) * grad_only(v.to(acc)))
            return v
        return None

    traj = sample_trajectory(inp.velocity, inp.noise, inp.sigmas, step_hook=grad_forwards)
    x0 = (traj.x0.to(acc) + torch.stack(post_terms).sum(0)).to(traj.x0.dtype)  # value == real x_0
    loss, r = hinge(inp, x0, s.lam)
    metrics = {
        "j": float(inp.sigmas[j]),
        "j_idx": float(j),
        "grad_forwards": float(len(pre) + len(post)),
        "reforwards": 0.0,
        "grad_rescale_factor": f,
    }
    return StepOutput(loss, r.detach(), metrics, traj.x0)


METHOD = MethodSpec(BridgeSettings, bridge_loss)

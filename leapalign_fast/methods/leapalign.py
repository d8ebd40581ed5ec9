"""LeapAlign (arXiv 2604.15311): reward gradients through a two-step leap `x_k -> x_j -> x_0`.

Two orders of the same gradient (`method.reward_first`):

- reward first (default, the paper's order): sample the whole trajectory without grad (N forwards, keeping
  x_k, x_j and the velocities there), weight `w = 1 / (max(d_j, tau) + max(d_0, tau))` from the leap replayed on
  those velocities,
  then decode + reward the real x_0 and take `g = dloss/dx_0` with `loss = mean(w * max(0, lam - r))`, and
  only then run the leap's two forwards with grad (`flow.leap_trajectory`) and send g back through them
  (`base.pullback`). The decoder's backward never runs on top of the transformer's activations: the step's
  peak is about two transformer forwards. N + 2 forwards.
- in the trajectory (`reward_first = false`): at index a (time k) the trajectory's own forward runs with grad
  and gives `xh_j = x_k - (k - j) v(x_k)`; at index b (time j) the connector `x_j' = xh_j + sg(x_j - xh_j)` is
  discounted, `u_j = alpha x_j' + (1 - alpha) sg(x_j')`, and `v(u_j, j)` runs with grad and drives the step.
  After the last step `xh_0 = x_j' - j v(u_j)`, `x_0' = xh_0 + sg(x_0 - xh_0)` and the loss is
  `sg(w) * max(0, lam - r(decode(x_0')))`. N forwards, but the decode + reward backward runs while both
  transformer graphs are held.

Both give the loss and gradient of the formula in docs/method.md (equal up to float round-off; tests check both
against `flow.leap_trajectory` and each other).
"""

from __future__ import annotations

import torch

from leapalign_fast.flow import as_batch_time, euler_step, leap_trajectory
from leapalign_fast.kernels.connector import connect, connect_discount
from leapalign_fast.kernels.similarity import similarity_weight
from leapalign_fast.methods.base import MethodSpec, StepInputs, StepOutput, draw_two_indices, pullback
from leapalign_fast.methods.indices import draw_pair
from leapalign_fast.methods.settings import LeapAlignSettings
from leapalign_fast.sampler import sample_trajectory


def leapalign_loss(
    inp: StepInputs,
    alpha: float,
    tau: float,
    lam: float,
    window: tuple[int, int],
    pair: tuple[int, int] | None = None,
    reward_first: bool = True,
) -> StepOutput:
    """`pair` = (a, b) forces the draw; by default two distinct indices uniform in `window`."""
    a, b = pair if pair is not None else draw_two_indices(*window, inp.generator)
    if reward_first:
        return _reward_first(inp, alpha, tau, lam, a, b)
    k, j = inp.sigmas[a], inp.sigmas[b]
    leap: dict[str, torch.Tensor] = {}

    def grad_forwards(i: int, x: torch.Tensor) -> torch.Tensor | None:
        if i == a:
            v_k = inp.velocity(x, as_batch_time(k, x))  # grad on
            leap["xh_j"] = euler_step(x, v_k, k, j)  # one-step leap x_k -> xh_j
            return v_k
        if i == b:
            x_j_conn, u_j, leap["d_j"] = connect_discount(leap["xh_j"], x, alpha)
            v_j = inp.velocity(u_j, as_batch_time(j, x))  # value == v(x_j): the trajectory's own step
            leap["xh_0"] = euler_step(x_j_conn, v_j, j, 0.0)  # one-step leap x_j' -> xh_0
            return v_j
        return None

    traj = sample_trajectory(inp.velocity, inp.noise, inp.sigmas, step_hook=grad_forwards)
    x0, d_0 = connect(leap["xh_0"], traj.x0)  # value x_0, gradient of the leap path
    w = similarity_weight(leap["d_j"], d_0, tau)  # (B,), no grad
    r = inp.reward(inp.decode(x0), inp.prompts)  # the reward sees the real image
    loss = (w * torch.relu(lam - r)).mean()
    metrics = {
        "k": float(k),
        "j": float(j),
        "d_j": leap["d_j"].mean().item(),  # host sync: logging only
        "d_0": d_0.mean().item(),
        "weight": w.mean().item(),
        "grad_forwards": 2.0,
        "reforwards": 0.0,
    }
    return StepOutput(loss, r.detach(), metrics, traj.x0)


def _reward_first(inp: StepInputs, alpha: float, tau: float, lam: float, a: int, b: int) -> StepOutput:
    k, j = inp.sigmas[a], inp.sigmas[b]
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(i: int, x: torch.Tensor) -> torch.Tensor | None:
        if i not in (a, b):
            return None
        with torch.no_grad():  # the call the sampler would make, kept with its input
            v = inp.velocity(x, as_batch_time(inp.sigmas[i], x))
        kept[i] = (x, v)
        return v

    traj = sample_trajectory(inp.velocity, inp.noise, inp.sigmas, step_hook=keep)  # no grad
    (x_k, v_k), (x_j, v_j) = kept[a], kept[b]
    with torch.no_grad():  # the leap on the velocities the trajectory computed at k and j: no model call
        replay = iter((v_k, v_j)).__next__
        sampled = leap_trajectory(lambda x, t: replay(), x_k, x_j, traj.x0, k, j, alpha)
    d_j, d_0 = sampled.d_j, sampled.d_0
    w = similarity_weight(d_j, d_0, tau)  # (B,), no grad
    kept.clear()  # the velocities at k and j are dropped: only the latents and the weight go on
    del v_k, v_j, sampled

    x0 = traj.x0.detach().requires_grad_(True)  # the real x_0 as a leaf: the reward's gradient stops here
    with torch.enable_grad():
        r = inp.reward(inp.decode(x0), inp.prompts)  # the reward sees the real image
        loss = (w * torch.relu(lam - r)).mean()
        (g,) = torch.autograd.grad(loss, x0)  # the decode + reward graph is freed here

    leap = leap_trajectory(inp.velocity, x_k, x_j, traj.x0, k, j, alpha)  # the two grad forwards
    metrics = {
        "k": float(k),
        "j": float(j),
        "d_j": d_j.mean().item(),
        "d_0": d_0.mean().item(),  # host sync: logging
        "weight": w.mean().item(),
        "grad_forwards": 2.0,
        "reforwards": 2.0,
    }
    return StepOutput(loss.detach() + pullback(leap.x0, g), r.detach(), metrics, traj.x0)


def _loss(inp: StepInputs, s: LeapAlignSettings) -> StepOutput:
    n = len(inp.sigmas) - 1
    return leapalign_loss(inp, s.alpha, s.tau, s.lam, s.window(n), draw_pair(s, n, inp.generator), s.reward_first)


METHOD = MethodSpec(LeapAlignSettings, _loss)

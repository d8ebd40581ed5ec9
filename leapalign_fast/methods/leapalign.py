"""LeapAlign (arXiv 2604.15311): reward gradients through a two-step leap built inside the sampling loop.

One trajectory, N model forwards. At index a (time k) the forward runs with grad and gives the
one-step leap `xh_j = x_k - (k - j) v(x_k)`. At index b (time j) the latent connector
`x_j' = xh_j + sg(x_j - xh_j)` (value x_j) is discounted, `u_j = alpha x_j' + (1 - alpha) sg(x_j')`
(value x_j, grad scaled by alpha), and the forward `v(u_j, j)` runs with grad. Both forwards are the
trajectory's own: their values drive the Euler steps, so nothing is re-run. After the last step,
`xh_0 = x_j' - j v(u_j)`, `x_0' = xh_0 + sg(x_0 - xh_0)` (value x_0), and the loss is
`sg(w) * max(0, lam - r(decode(x_0')))` with `w = 1 / (max(d_j, tau) + max(d_0, tau))`.
`flow.leap_trajectory` states the same leap as a pure function; tests check the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leapalign_fast.flow import as_batch_time, euler_step
from leapalign_fast.kernels import connect, connect_discount, similarity_weight
from leapalign_fast.methods.base import MethodSpec, StepInputs, StepOutput, draw_two_indices, need
from leapalign_fast.methods.indices import PairSettings
from leapalign_fast.sampler import sample_trajectory


@dataclass
class LeapAlignSettings(PairSettings):
    name: str = "leapalign"
    alpha: float = 0.3  # gradient discount of the nested term
    tau: float = 0.1  # distance floor of the similarity weight

    def validate(self, num_steps: int) -> None:
        need(0.0 <= self.alpha <= 1.0, f"method.alpha must be in [0, 1], got {self.alpha}")
        need(self.tau > 0, f"method.tau must be > 0, got {self.tau}")
        super().validate(num_steps)


def leapalign_loss(inp: StepInputs, alpha: float, tau: float, lam: float, window: tuple[int, int],
                   pair: tuple[int, int] | None = None) -> StepOutput:  # fmt: skip
    """`pair` = (a, b) forces the draw; by default two distinct indices uniform in `window`."""
    a, b = pair if pair is not None else draw_two_indices(*window, inp.generator)
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
    }
    return StepOutput(loss, r.detach(), metrics, traj.x0)


def _loss(inp: StepInputs, s: LeapAlignSettings) -> StepOutput:
    n = len(inp.sigmas) - 1
    return leapalign_loss(inp, s.alpha, s.tau, s.lam, s.window(n), s.draw(n, inp.generator))


METHOD = MethodSpec("leapalign", LeapAlignSettings, _loss)

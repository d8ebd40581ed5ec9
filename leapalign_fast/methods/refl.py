"""ReFL (Xu et al., ImageReward, NeurIPS 2023): no-grad sampling to a random late step t, one grad forward,
reward on the one-step prediction `x_t - t v(x_t, t)`; loss `max(0, lam - r)`.

Published FLUX.1 setting (FlowBP's `refl.last_n_steps = 11` at N = 25): t is one of the last 11 of 25 steps
(t 0.07-0.60). The count scales with N as `round(late_fraction * N)`; `late_steps` > 0 fixes it instead
(this project's earlier default was `late_steps = 2`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leapalign_fast.flow import as_batch_time, euler_step
from leapalign_fast.methods.base import MethodSettings, MethodSpec, StepInputs, StepOutput, hinge, need, prefix_state


@dataclass
class ReFLSettings(MethodSettings):
    name: str = "refl"
    late_fraction: float = 0.44  # the grad step is one of the last round(late_fraction * N) steps (11 of 25)
    late_steps: int = 0  # > 0: one of the last `late_steps` steps instead, for any N

    def count(self, num_steps: int) -> int:
        return self.late_steps if self.late_steps > 0 else max(1, round(self.late_fraction * num_steps))

    def grad_graphs(self, num_steps: int) -> int:
        return 1

    def validate(self, num_steps: int) -> None:
        need(0.0 < self.late_fraction <= 1.0, f"method.late_fraction must be in (0, 1], got {self.late_fraction}")
        need(0 <= self.late_steps <= num_steps,
             f"method.late_steps must be in [0, num_steps={num_steps}] (0: use method.late_fraction), "
             f"got {self.late_steps}")  # fmt: skip


def refl_loss(inp: StepInputs, s: ReFLSettings) -> StepOutput:
    n = len(inp.sigmas) - 1
    i = n - 1 - int(torch.randint(s.count(n), (1,), generator=inp.generator))  # one of the last count(n) steps
    x_t = prefix_state(inp, i)
    t = inp.sigmas[i]
    x0_pred = euler_step(x_t, inp.velocity(x_t, as_batch_time(t, x_t)), t, 0.0)  # one-step prediction
    loss, r = hinge(inp, x0_pred, s.lam)
    return StepOutput(loss, r.detach(), {"t": float(t), "grad_forwards": 1.0}, x0_pred.detach())


METHOD = MethodSpec("refl", ReFLSettings, refl_loss)

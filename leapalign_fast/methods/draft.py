"""DRaFT-K (Clark et al., arXiv 2309.17400): backprop through the last K sampling steps (K = 1: DRaFT-1)."""

from __future__ import annotations

from dataclasses import dataclass

from leapalign_fast.methods.base import MethodSettings, MethodSpec, StepInputs, StepOutput, hinge, need, prefix_state
from leapalign_fast.sampler import integrate_with_grad


@dataclass
class DraftSettings(MethodSettings):
    name: str = "draft"
    draft_k: int = 1  # backprop through the last K steps
    checkpointing: bool = False  # recompute the grad forwards in the backward (activation checkpointing)

    def grad_graphs(self, num_steps: int) -> int:
        return self.draft_k

    def validate(self, num_steps: int) -> None:
        n = num_steps
        need(1 <= self.draft_k <= n, f"method.draft_k must be in [1, num_steps={n}], got {self.draft_k}")


def draft_loss(inp: StepInputs, s: DraftSettings) -> StepOutput:
    n, k = len(inp.sigmas) - 1, s.draft_k
    x = prefix_state(inp, n - k)
    x0 = integrate_with_grad(inp.velocity, x, inp.sigmas, n - k, n, checkpoint=s.checkpointing)
    loss, r = hinge(inp, x0, s.lam)
    return StepOutput(loss, r.detach(), {"k": float(k), "grad_forwards": float(k)}, x0.detach())


METHOD = MethodSpec("draft", DraftSettings, draft_loss)

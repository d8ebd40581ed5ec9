"""DRaFT-K (Clark et al., arXiv 2309.17400): backprop through the last K sampling steps (K = 1: DRaFT-1)."""

from __future__ import annotations

from leapalign_fast.methods.base import MethodSpec, StepInputs, StepOutput, hinge, prefix_state
from leapalign_fast.methods.settings import DraftSettings
from leapalign_fast.sampler import integrate_with_grad


def draft_loss(inp: StepInputs, s: DraftSettings) -> StepOutput:
    n, k = len(inp.sigmas) - 1, s.draft_k
    x = prefix_state(inp, n - k)
    x0 = integrate_with_grad(inp.velocity, x, inp.sigmas, n - k, n, checkpoint=s.checkpointing)
    loss, r = hinge(inp, x0, s.lam)
    return StepOutput(loss, r.detach(), {"k": float(k), "grad_forwards": float(k)}, x0.detach())


METHOD = MethodSpec(DraftSettings, draft_loss)

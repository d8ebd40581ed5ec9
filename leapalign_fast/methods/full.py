"""Full-trajectory backprop: all N steps with grad (optionally with activation checkpointing): the memory and
throughput reference, not an alignment method of its own."""

from __future__ import annotations

from leapalign_fast.methods.base import MethodSpec, StepInputs, StepOutput, hinge
from leapalign_fast.methods.settings import FullSettings
from leapalign_fast.sampler import integrate_with_grad


def full_loss(inp: StepInputs, s: FullSettings) -> StepOutput:
    n = len(inp.sigmas) - 1
    x0 = integrate_with_grad(inp.velocity, inp.noise.detach(), inp.sigmas, 0, n, checkpoint=s.checkpointing)
    loss, r = hinge(inp, x0, s.lam)
    return StepOutput(loss, r.detach(), {"grad_forwards": float(n)}, x0.detach())


METHOD = MethodSpec(FullSettings, full_loss)

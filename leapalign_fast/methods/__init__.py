"""Methods: each one loss builder on the shared sampler, selected by `method.name`."""

from __future__ import annotations

import difflib
from typing import Callable

from leapalign_fast.errors import UserError
from leapalign_fast.methods.base import StepInputs, StepOutput, resolve_window
from leapalign_fast.methods.leapalign import leapalign_loss

LossBuilder = Callable[[StepInputs], StepOutput]


def build_method(cfg, num_steps: int) -> LossBuilder:
    """Bind a method's hyper-parameters from the `[method]` config table; returns `inputs -> StepOutput`."""
    builders = {
        "leapalign": lambda: (
            lambda inp: leapalign_loss(inp, cfg.alpha, cfg.tau, cfg.lam, resolve_window(cfg.index_window, num_steps))
        ),
    }
    if cfg.name not in builders:
        close = difflib.get_close_matches(cfg.name, builders, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown method '{cfg.name}'; known methods: {', '.join(sorted(builders))}.{hint}")
    resolve_window(cfg.index_window, num_steps)  # fail at start, not at the first step
    return builders[cfg.name]()


__all__ = ["StepInputs", "StepOutput", "build_method"]

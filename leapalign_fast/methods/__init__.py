"""Methods: each one loss builder on the shared sampler, selected by `method.name`."""

from __future__ import annotations

import difflib
from typing import Callable

from leapalign_fast.errors import UserError
from leapalign_fast.methods.base import StepInputs, StepOutput, resolve_window
from leapalign_fast.methods.baselines import draft_loss, draft_lv_loss, drtune_loss, full_loss, refl_loss
from leapalign_fast.methods.leapalign import leapalign_loss

LossBuilder = Callable[[StepInputs], StepOutput]


def build_method(cfg, num_steps: int) -> LossBuilder:
    """Bind a method's hyper-parameters from the `[method]` config table; returns `inputs -> StepOutput`."""
    window = lambda: resolve_window(cfg.index_window, num_steps)  # noqa: E731
    builders = {
        "leapalign": lambda: (lambda inp: leapalign_loss(inp, cfg.alpha, cfg.tau, cfg.lam, window())),
        "refl": lambda: (lambda inp: refl_loss(inp, cfg.lam, cfg.late_steps)),
        "draft": lambda: (lambda inp: draft_loss(inp, cfg.lam, cfg.draft_k, cfg.checkpointing)),
        "draft_lv": lambda: (lambda inp: draft_lv_loss(inp, cfg.lam, cfg.renoise)),
        "drtune": lambda: (lambda inp: drtune_loss(inp, cfg.lam, cfg.drtune_steps, window())),
        "full": lambda: (lambda inp: full_loss(inp, cfg.lam, cfg.checkpointing)),
    }
    if cfg.name not in builders:
        close = difflib.get_close_matches(cfg.name, builders, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown method '{cfg.name}'; known methods: {', '.join(sorted(builders))}.{hint}")
    resolve_window(cfg.index_window, num_steps)  # fail at start, not at the first step
    return builders[cfg.name]()


__all__ = ["StepInputs", "StepOutput", "build_method"]

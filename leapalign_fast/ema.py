"""Exponential moving average of the trained parameters."""

from __future__ import annotations

import torch


class EMA:
    """EMA of the trained parameters, kept in float32 (sharded like them under FSDP)."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.reset(named)

    def reset(self, named: dict[str, torch.Tensor]) -> None:
        """Start over from `named` (a resumed checkpoint without an EMA)."""
        self.shadow = {n: t.detach().float().clone() for n, t in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.Tensor]) -> None:
        for n, t in named.items():
            self.shadow[n].lerp_(t.float(), 1.0 - self.decay)

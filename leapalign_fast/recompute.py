"""Activation checkpointing of the decode + reward that ends every method's step (`model.checkpoint_decode`).

Without it, the VAE decode and the reward model keep their whole autograd graph from the end of the forward to
the backward: at the mid size as large as one transformer forward, at FLUX size (VAE at 512²-1024², CLIP-H) often
larger. With it, only their inputs are kept, the (B, L, 64) latents and the (B, 3, H, W) image; the backward
re-runs each forward, the decode one VAE block at a time (diffusers' per-block checkpointing), so its transient
is one block's activations. Values and gradients are unchanged (the recompute is the same ops on the same inputs).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def recomputed(fn: Callable) -> Callable:
    """`fn(*args)` that keeps only its inputs for the backward and recomputes its graph there."""

    def call(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False)

    return call


def checkpointed_decode_reward(vae, decode: Callable, reward: Callable, enabled: bool) -> tuple[Callable, Callable]:
    """(decode, reward) as a step uses them; with `enabled`, both are recomputed in the backward and the VAE
    decoder checkpoints per block (only grad-enabled calls: no-grad decodes such as grids are unaffected)."""
    if not enabled:
        return decode, reward
    if getattr(vae, "_supports_gradient_checkpointing", False) and not vae.is_gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    return recomputed(decode), recomputed(reward)

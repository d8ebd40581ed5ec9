"""Trajectory-similarity weight `1 / (max(d_j, tau) + max(d_0, tau))` per sample, (B,) float32, no grad."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import block_size, jit, use_triton
from .reference import similarity_weight_ref


def _similarity_kernel(D_J, D_0, OUT, n, tau, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d_j = tl.load(D_J + offs, mask=mask, other=1.0).to(tl.float32)
    d_0 = tl.load(D_0 + offs, mask=mask, other=1.0).to(tl.float32)
    # PropagateNan.ALL: a NaN distance gives a NaN weight, as the reference's clamp_min does (the default maximum
    # returns tau for NaN and would hide a diverged sample behind the floor's weight).
    w_j = tl.maximum(d_j, tau, propagate_nan=tl.PropagateNan.ALL)
    w_0 = tl.maximum(d_0, tau, propagate_nan=tl.PropagateNan.ALL)
    tl.store(OUT + offs, 1.0 / (w_j + w_0), mask=mask)


def similarity_weight_triton(d_j: torch.Tensor, d_0: torch.Tensor, tau: float) -> torch.Tensor:
    if d_j.shape != d_0.shape or d_j.dim() != 1:
        raise ValueError(f"similarity_weight needs two (B,) tensors, got {tuple(d_j.shape)} and {tuple(d_0.shape)}")
    d_j, d_0 = d_j.detach().contiguous(), d_0.detach().contiguous()
    out = torch.empty(d_j.shape, device=d_j.device, dtype=torch.float32)
    n = out.numel()
    block = block_size(n, gpu_block=1024)
    if n:
        jit(_similarity_kernel)[(triton.cdiv(n, block),)](d_j, d_0, out, n, float(tau), BLOCK=block)
    return out


def similarity_weight(d_j: torch.Tensor, d_0: torch.Tensor, tau: float, impl: str = "auto") -> torch.Tensor:
    if use_triton(d_j, impl):
        return similarity_weight_triton(d_j, d_0, tau)
    return similarity_weight_ref(d_j, d_0, tau)

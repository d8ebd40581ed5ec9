"""Fused latent connector (+ discounted mixing) with the per-sample distance, forward and backward.

Forward, one pass: read `x_pred`, `x_real`; write `x_conn` (and `x_disc`), both with the value of `x_real`;
reduce `|x_real - x_pred|` per row in float32 into per-block partial sums (summed deterministically after).
Backward, one pass: `grad_pred = grad_conn + alpha * grad_disc`; `x_real` gets no gradient (stop-grad).
Shapes: inputs (B, ...) batch-first, any dtype; viewed as (B, n) rows; dist (B,) float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import block_size, jit, use_triton
from .reference import connect_discount_ref, connect_ref

# ---- kernels -------------------------------------------------------------------------------------------


def _connect_fwd_kernel(
    X_PRED,
    X_REAL,
    OUT_CONN,
    OUT_DISC,
    PARTIAL,
    n_cols,
    n_blocks,
    WRITE_DISC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A 1-D grid of n_rows * n_blocks programs: CUDA caps a grid's second dimension at 65535 blocks, its first at
    # 2**31 - 1, so rows of more than 65535 blocks launch too.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_blocks
    blk = pid % n_blocks
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    base = row.to(tl.int64) * n_cols
    x_pred = tl.load(X_PRED + base + offs, mask=mask, other=0.0)
    x_real = tl.load(X_REAL + base + offs, mask=mask, other=0.0)
    tl.store(OUT_CONN + base + offs, x_real, mask=mask)
    if WRITE_DISC:
        tl.store(OUT_DISC + base + offs, x_real, mask=mask)
    diff = tl.abs(x_real.to(tl.float32) - x_pred.to(tl.float32))
    tl.store(PARTIAL + row * n_blocks + blk, tl.sum(diff, axis=0))


def _connect_bwd_kernel(
    G_CONN,
    G_DISC,
    G_PRED,
    n,
    ALPHA,
    HAS_CONN: tl.constexpr,
    HAS_DISC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=ACC)
    if HAS_CONN:
        acc += tl.load(G_CONN + offs, mask=mask, other=0.0).to(ACC)
    if HAS_DISC:
        acc += tl.load(ALPHA).to(ACC) * tl.load(G_DISC + offs, mask=mask, other=0.0).to(ACC)
    tl.store(G_PRED + offs, acc.to(G_PRED.dtype.element_ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------------


def _check(x_pred: torch.Tensor, x_real: torch.Tensor) -> None:
    if x_pred.shape != x_real.shape or x_pred.dtype != x_real.dtype or x_pred.device != x_real.device:
        raise ValueError(
            f"connector inputs must match: x_pred {tuple(x_pred.shape)} {x_pred.dtype} {x_pred.device}, "
            f"x_real {tuple(x_real.shape)} {x_real.dtype} {x_real.device}"
        )
    if x_pred.dim() < 1 or x_pred.shape[0] == 0:
        raise ValueError(f"connector inputs need a non-empty batch dimension, got {tuple(x_pred.shape)}")


def connect_forward(x_pred: torch.Tensor, x_real: torch.Tensor, write_disc: bool):
    """Launch the fused forward; returns (x_conn, x_disc or None, dist (B,) float32)."""
    _check(x_pred, x_real)
    x_pred_c, x_real_c = x_pred.detach().contiguous(), x_real.detach().contiguous()  # copies only if strided
    b = x_pred.shape[0]
    n = x_pred.numel() // b
    x_conn = torch.empty_like(x_real_c)
    x_disc = torch.empty_like(x_real_c) if write_disc else x_conn
    block = block_size(n)
    n_blocks = triton.cdiv(n, block)
    partial = torch.empty(b, n_blocks, device=x_pred.device, dtype=torch.float32)
    if n > 0:
        jit(_connect_fwd_kernel)[(b * n_blocks,)](
            x_pred_c,
            x_real_c,
            x_conn,
            x_disc,
            partial,
            n,
            n_blocks,
            WRITE_DISC=write_disc,
            BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
        dist = partial.sum(dim=1) / n
    else:
        dist = torch.zeros(b, device=x_pred.device, dtype=torch.float32)
    return x_conn, (x_disc if write_disc else None), dist


def connect_backward(grad_conn, grad_disc, alpha: float, like: torch.Tensor) -> torch.Tensor:
    """grad_pred = grad_conn + alpha * grad_disc (either may be None), in `like`'s dtype and shape."""
    g_pred = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    n = g_pred.numel()
    gc = grad_conn.contiguous() if grad_conn is not None else g_pred
    gd = grad_disc.contiguous() if grad_disc is not None else g_pred
    block = block_size(n, gpu_block=4096)
    # alpha travels as a one-element tensor of the accumulator's dtype: compiled Triton types a Python float
    # argument as float32 (the interpreter keeps it float64), which would round alpha = 0.3 to 0.30000001 in the
    # float64 backward. torch.full launches a fill, no host-device synchronization.
    acc64 = like.dtype == torch.float64
    alpha_t = torch.full((1,), float(alpha), dtype=torch.float64 if acc64 else torch.float32, device=like.device)
    if n > 0:
        jit(_connect_bwd_kernel)[(triton.cdiv(n, block),)](
            gc,
            gd,
            g_pred,
            n,
            alpha_t,
            HAS_CONN=grad_conn is not None,
            HAS_DISC=grad_disc is not None,
            ACC=tl.float64 if acc64 else tl.float32,
            BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
    return g_pred


# ---- autograd ------------------------------------------------------------------------------------------


class ConnectFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_pred, x_real):
        x_conn, _, dist = connect_forward(x_pred, x_real, write_disc=False)
        ctx.mark_non_differentiable(dist)
        return x_conn, dist

    @staticmethod
    def backward(ctx, grad_conn, grad_dist):
        return grad_conn, None  # identity to x_pred; x_real is stop-grad


class ConnectDiscountFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_pred, x_real, alpha):
        x_conn, x_disc, dist = connect_forward(x_pred, x_real, write_disc=True)
        ctx.alpha = alpha  # nothing else is saved: the backward needs only the incoming gradients
        ctx.mark_non_differentiable(dist)
        return x_conn, x_disc, dist

    @staticmethod
    def backward(ctx, grad_conn, grad_disc, grad_dist):
        if grad_conn is None and grad_disc is None:
            return None, None, None
        like = grad_conn if grad_conn is not None else grad_disc
        return connect_backward(grad_conn, grad_disc, ctx.alpha, like), None, None


# ---- public ops ----------------------------------------------------------------------------------------


def connect(x_pred: torch.Tensor, x_real: torch.Tensor, impl: str = "auto"):
    """`(x_conn, dist)`: x_conn has x_real's value and identity gradient to x_pred; dist (B,) float32, no grad."""
    if use_triton(x_pred, impl):
        return ConnectFunction.apply(x_pred, x_real)
    return connect_ref(x_pred, x_real)


def connect_discount(x_pred: torch.Tensor, x_real: torch.Tensor, alpha: float, impl: str = "auto"):
    """`(x_conn, x_disc, dist)`: x_disc has x_real's value and gradient alpha to x_pred (through x_conn)."""
    if use_triton(x_pred, impl):
        return ConnectDiscountFunction.apply(x_pred, x_real, float(alpha))
    return connect_discount_ref(x_pred, x_real, alpha)

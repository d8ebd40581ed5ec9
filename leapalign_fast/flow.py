"""Rectified-flow math shared by every method: FLUX.1-dev's schedule, the Euler steps, and the leap.

Conventions (diffusers' FLUX): `t` in [0, 1], `t = 1` is noise, `x_t = (1 - t) x_data + t noise`,
the model predicts `v = noise - x_data`, and an Euler step from `t` to `s < t` is `x_s = x_t - (t - s) v`.
Times are floats or (B,) tensors; latents are batch-first, e.g. (B, L, 64) packed FLUX latents.

Two Euler steps, equal in float32 (and float64): `scheduler_step` is FlowMatchEulerDiscreteScheduler.step's
arithmetic, which in bf16/fp16 rounds `dt v` to the model dtype; every trajectory steps with it (sampler.py), so
bf16 samples are the pipelines'. `euler_step` keeps float32 arithmetic for the predictions training makes besides
the trajectory (LeapAlign's leaps, one-step predictions): see `euler_step`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from leapalign_fast.kernels.connector import connect, connect_discount

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # v(x (B, ...), t (B,)) -> (B, ...)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift `mu`, linear in the packed image token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_schedule(num_steps: int, image_seq_len: int, shift: bool = True, device=None) -> torch.Tensor:
    """(N + 1,) float32 times `1 = t_0 > ... > t_{N-1} > t_N = 0`, as FluxPipeline builds them with FLUX.1-dev's
    scheduler config (dynamic shift, 0.5 ... 1.15). The FLUX backbone reads its model directory's config instead
    (models/flux.py: schnell's is a static shift 1.0); this is the toy benchmarks' and the tests' dev schedule.

    `linspace(1, 1/N, N)` in float32, exponentially shifted by `mu` from the token count, then 0 appended.
    Put it on the latents' device: every Euler step reads it, and a CPU schedule is a host copy per read.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if shift:
        mu = calculate_shift(image_seq_len)
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
    return torch.cat([sigmas, torch.zeros(1)]).to(device)


def as_batch_time(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A time as a (B,) tensor on x's device (float32). A float or a tensor on another device is copied to x's
    device: keep schedules on the device (`sample_trajectory` moves its schedule once per trajectory)."""
    t = torch.as_tensor(t, device=x.device)
    t = t.to(torch.promote_types(x.dtype, torch.float32) if t.is_floating_point() else torch.float32)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def euler_step(x_t: torch.Tensor, v: torch.Tensor, t, s) -> torch.Tensor:
    """`x_s = x_t - (t - s) v`, computed in at least float32, cast back to x's dtype; times may differ per sample.

    Also the one-step leap prediction `xh_s` when `t - s` spans several trajectory steps. Training's predictions
    beside the trajectory use it (LeapAlign's leaps, whose values the connectors replace by the trajectory's states
    and which carry the gradient; ReFL/DRTune/DRaFT-LV's one-step x0): in bf16 its product `(t - s) v` is not
    rounded to bf16 as the scheduler's is (`scheduler_step`), one rounding less on the gradient's path. In float32
    the two are the same number.
    """
    acc = torch.promote_types(x_t.dtype, torch.float32)
    dt = _per_sample(as_batch_time(t, x_t) - as_batch_time(s, x_t), x_t).to(acc)
    return (x_t.to(acc) - dt * v.to(acc)).to(x_t.dtype)


REDUCED = (torch.bfloat16, torch.float16)


def scheduler_step(x_t: torch.Tensor, v: torch.Tensor, t, s) -> torch.Tensor:
    """One trajectory step `x_t -> x_s` (one time for the whole batch) as FlowMatchEulerDiscreteScheduler.step
    computes it: `x_t` upcast to float32, plus `dt * v` with `dt = s - t` a 0-dim float32 tensor on x's device
    (the product in v's dtype: bf16 in a bf16 run), cast back to x's dtype. The same torch operations on the same
    operand kinds as the scheduler, so bf16 trajectories are the pipelines' bit for bit, on any device.

    Float32 and float64 latents take `euler_step` (in float32 `x + (s - t) v` and `x - (t - s) v` are the same
    number): runs in float32 and the float64 oracles of the tests are unchanged.
    """
    if x_t.dtype not in REDUCED:
        return euler_step(x_t, v, t, s)
    t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
    s = torch.as_tensor(s, device=x_t.device, dtype=torch.float32)
    if t.dim() or s.dim():
        raise ValueError("scheduler_step takes one time for the whole batch (a sigma of the schedule)")
    return (x_t.to(torch.float32) + (s - t) * v).to(x_t.dtype)


class LeapResult(NamedTuple):
    x0: torch.Tensor  # (B, ...) value == x_0, gradient of the leap path
    d_j: torch.Tensor  # (B,) float32 mean|x_j - xh_j|, no grad
    d_0: torch.Tensor  # (B,) float32 mean|x_0 - xh_0|, no grad


def leap_trajectory(
    velocity: Velocity,
    x_k: torch.Tensor,
    x_j: torch.Tensor,
    x_0: torch.Tensor,
    k: float | torch.Tensor,
    j: float | torch.Tensor,
    alpha: float,
) -> LeapResult:
    """The two-step leap `x_k -> x_j -> x_0` of LeapAlign (arXiv 2604.15311), as a pure function.

    `x_k`, `x_j`, `x_0` are real (detached) trajectory states at times `1 >= k > j > 0` and 0.
    The returned `x0` equals `x_0` in value; its gradient w.r.t. the velocity's parameters is
    `-j dv(x_j) - (k-j) dv(x_k) + alpha j (k-j) dv(x_j)/dx_j . dv(x_k)`.
    """
    k, j = as_batch_time(k, x_k), as_batch_time(j, x_k)
    xh_j = euler_step(x_k, velocity(x_k, k), k, j)  # leap 1 (grad on)
    x_jc, u_j, d_j = connect_discount(xh_j, x_j, alpha)  # value x_j; u_j carries alpha * grad
    xh_0 = euler_step(x_jc, velocity(u_j, j), j, 0.0)  # leap 2
    x0, d_0 = connect(xh_0, x_0)  # value x_0
    return LeapResult(x0, d_j, d_0)

"""The method's first correctness test: the leap's gradient is the paper's three-term formula."""

import pytest
import torch

from leapalign_fast.flow import calculate_shift, euler_step, flux_schedule, leap_trajectory, scheduler_step


class MLPVelocity(torch.nn.Module):
    """A tiny smooth velocity field v(x, t) on (B, L, C) inputs."""

    def __init__(self, channels: int = 5, hidden: int = 16):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(channels + 1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, channels)
        )

    def forward(self, x, t):
        tt = t.reshape(-1, 1, 1).expand(*x.shape[:-1], 1).to(x.dtype)
        return self.net(torch.cat([x, tt], dim=-1))


def _param_grad(scalar, params, **kw):
    return torch.autograd.grad(scalar, params, **kw)


@pytest.mark.parametrize("seed", range(6))
def test_leap_gradient_matches_paper_formula(seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLPVelocity().double()
    params = list(model.parameters())
    B, L, C = 3, 4, 5
    x_k, x_j, x_0, c = (torch.randn(B, L, C, generator=g, dtype=torch.float64) for _ in range(4))
    k, j = sorted(torch.rand(2, generator=g).tolist(), reverse=True)
    j = max(j, 1e-3)
    alpha = torch.rand(1, generator=g).item()

    res = leap_trajectory(model, x_k, x_j, x_0, k, j, alpha)
    torch.testing.assert_close(res.x0, x_0, rtol=0, atol=1e-12)  # value is the real x_0
    got = _param_grad((c * res.x0).sum(), params)

    # The formula, each Jacobian product by autograd on the velocity field directly.
    tk = torch.full((B,), k, dtype=torch.float64)
    tj = torch.full((B,), j, dtype=torch.float64)
    x_j_in = x_j.clone().requires_grad_(True)
    v_j = model(x_j_in, tj)
    dvj_dtheta = _param_grad((c * v_j).sum(), params, retain_graph=True)
    (w,) = torch.autograd.grad((c * v_j).sum(), x_j_in)  # c^T dv(x_j)/dx_j
    v_k = model(x_k, tk)
    dvk_dtheta = _param_grad((c * v_k).sum(), params, retain_graph=True)
    nested = _param_grad((w * v_k).sum(), params)
    want = [-j * a - (k - j) * b + alpha * j * (k - j) * n for a, b, n in zip(dvj_dtheta, dvk_dtheta, nested)]
    for gi, wi in zip(got, want):
        torch.testing.assert_close(gi, wi, rtol=0, atol=1e-10)


def test_leap_per_sample_times_and_distances():
    torch.manual_seed(0)
    model = MLPVelocity().double()
    B = 4
    x_k, x_j, x_0 = (torch.randn(B, 2, 5, dtype=torch.float64) for _ in range(3))
    k = torch.tensor([1.0, 0.9, 0.5, 0.3], dtype=torch.float64)
    j = torch.tensor([0.5, 0.2, 0.4, 0.1], dtype=torch.float64)
    res = leap_trajectory(model, x_k, x_j, x_0, k, j, 0.3)
    with torch.no_grad():
        xh_j = x_k - (k - j).view(-1, 1, 1) * model(x_k, k)
        xh_0 = x_j - j.view(-1, 1, 1) * model(x_j, j)
    torch.testing.assert_close(res.d_j, (x_j - xh_j).abs().mean(dim=(1, 2)).float())
    torch.testing.assert_close(res.d_0, (x_0 - xh_0).abs().mean(dim=(1, 2)).float())
    assert not res.d_j.requires_grad and res.d_j.shape == (B,)


def test_flux_schedule_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    for n, seq in [(25, 4096), (8, 16), (50, 1024)]:
        import numpy as np

        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(seq))
        ours = flux_schedule(n, seq)
        torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=1e-7)
        assert ours[0] == 1.0 and ours[-1] == 0.0 and bool((ours[1:] < ours[:-1]).all())


def test_euler_step_matches_scheduler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    import numpy as np

    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.7)
    x, v = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    want = sched.step(v, sched.timesteps[0], x, return_dict=False)[0]
    got = euler_step(x, v, sched.sigmas[0], sched.sigmas[1])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scheduler_step_is_the_schedulers_bit_for_bit(dtype):
    """Every step of a 25-step schedule, as FlowMatchEulerDiscreteScheduler.step computes it in the latents' dtype;
    in bf16/fp16 euler_step (float32 product, training's leaps) is another number, in float32 the same one."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 25, 25), mu=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 16, generator=gen).to(dtype)
    apart = 0.0
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 64, 16, generator=gen).to(dtype)
        want = sched.step(v, t, x, return_dict=False)[0]
        got = scheduler_step(x, v, sched.sigmas[i], sched.sigmas[i + 1])
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        apart = max(apart, (euler_step(x, v, sched.sigmas[i], sched.sigmas[i + 1]) - want).abs().max().item())
        x = want
    assert apart > 0 if dtype != torch.float32 else apart == 0


def test_scheduler_step_keeps_float64_and_takes_one_time():
    """The float64 oracles of the tests step in float64 as before (the scheduler would round to float32)."""
    x, v = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    t, s = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    got = scheduler_step(x, v, t, s)
    assert got.dtype == torch.float64 and torch.equal(got, euler_step(x, v, t, s))
    assert not torch.equal(got, (x.float() + (s - t).float() * v.float()).double())  # float32 would show
    with pytest.raises(ValueError, match="one time for the whole batch"):
        scheduler_step(x.bfloat16(), v.bfloat16(), torch.tensor([0.7, 0.6]), 0.3)


def test_flux_tiny_schedule_is_the_hard_coded_dev_schedule():
    """The FLUX backbone now reads its scheduler config; the tiny build's (FLUX.1-dev's) gives the schedule every
    float32 run so far used, bit for bit (the toy run's numbers are unchanged)."""
    from leapalign_fast.models.backbone import Geometry
    from leapalign_fast.models.flux import FluxComponents, schedule

    comps = FluxComponents(None, None, None)
    for n in (1, 4, 25, 28, 50):
        for tokens in (4, 16, 256, 1024, 2025, 4096):
            assert torch.equal(schedule(comps, n, Geometry(2, 2, tokens, 64)), flux_schedule(n, tokens))

"""LeapAlign == the pure leap oracle in both orders: reward first (N + 2 model calls, 2 with grad) and inside
the sampling loop (exactly N calls, 2 with grad); the two orders give the same loss and gradients."""

import json

import pytest
import torch
from test_flow import MLPVelocity

from leapalign_fast.errors import UserError
from leapalign_fast.flow import leap_trajectory
from leapalign_fast.kernels.similarity import similarity_weight
from leapalign_fast.methods.base import StepInputs, draw_two_indices
from leapalign_fast.methods.leapalign import leapalign_loss
from leapalign_fast.methods.settings import resolve_window
from leapalign_fast.sampler import sample_trajectory


class Counting:
    def __init__(self, fn):
        self.fn, self.calls, self.grad_calls = fn, 0, 0

    def __call__(self, x, t):
        self.calls += 1
        self.grad_calls += int(torch.is_grad_enabled())
        return self.fn(x, t)


def _reward(images, prompts):  # a smooth differentiable reward on (B, 3, H, W)
    return torch.sigmoid(images.mean(dim=(1, 2, 3)) * 3.0) + 0.1 * images[:, 0].square().mean(dim=(1, 2))


def _decode(x):  # (B, L, C) -> (B, 3, L, C // 3) "image"
    b, l, c = x.shape
    return torch.tanh(x[..., : 3 * (c // 3)]).reshape(b, l, 3, c // 3).permute(0, 2, 1, 3)


def _oracle_loss(model, noise, sigmas, a, b, alpha, tau, lam):
    traj = sample_trajectory(model, noise, sigmas, keep_states=True)
    s = traj.states
    res = leap_trajectory(model, s[a], s[b], s[-1], sigmas[a], sigmas[b], alpha)
    w = similarity_weight(res.d_j, res.d_0, tau)
    return (w * torch.relu(lam - _reward(_decode(res.x0), None))).mean(), traj.x0


@pytest.mark.parametrize("reward_first", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_leapalign_equals_oracle_and_counts_model_calls(seed, reward_first):
    torch.manual_seed(seed)
    N, B = 7, 3
    model = MLPVelocity(channels=6).double()
    params = list(model.parameters())
    sigmas = torch.linspace(1.0, 0.0, N + 1, dtype=torch.float64) ** 1.3
    noise = torch.randn(B, 5, 6, dtype=torch.float64)
    alpha, tau, lam = 0.3, 0.01, 2.0

    counted = Counting(model)
    gen = torch.Generator().manual_seed(100 + seed)
    out = leapalign_loss(
        StepInputs(counted, noise, sigmas, _decode, _reward, ["p"] * B, gen),
        alpha,
        tau,
        lam,
        (0, N),
        reward_first=reward_first,
    )
    got = torch.autograd.grad(out.loss, params)
    assert counted.calls == N + 2 * reward_first and counted.grad_calls == 2

    a, b = draw_two_indices(0, N, torch.Generator().manual_seed(100 + seed))
    assert out.metrics["k"] == pytest.approx(float(sigmas[a])) and out.metrics["j"] == pytest.approx(float(sigmas[b]))
    want_loss, x0 = _oracle_loss(model, noise, sigmas, a, b, alpha, tau, lam)
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(out.loss, want_loss, rtol=0, atol=1e-12)
    # the in-loop trajectory is the no-grad one (up to the connectors' float round-off: xh + (x - xh));
    # reward first samples it without grad: exactly the no-grad one
    torch.testing.assert_close(out.x0, x0, rtol=0, atol=0 if reward_first else 1e-13)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in got)


def _independent_oracle(model, noise, sigmas, a, b, alpha, tau, lam, lam_scale=1.0):
    """LeapAlign's loss written from the formula alone, in float64, using none of the code it checks (no sampler,
    no flow.leap_trajectory, no connector or similarity kernel): Euler states, the leap through x_k and x_j with
    latent connectors (value real, gradient predicted), the alpha-discounted input at j, the distances, the weight
    and the hinge. Returns (loss, d_j, d_0, w)."""
    x, states = noise, [noise]
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            t = sigmas[i].expand(x.shape[0])
            x = x + (sigmas[i + 1] - sigmas[i]) * model(x, t)
            states.append(x)
    x_k, x_j, x_0 = states[a], states[b], states[-1]
    k, j = sigmas[a], sigmas[b]
    xh_j = x_k - (k - j) * model(x_k, k.expand(x_k.shape[0]))
    xj_conn = xh_j + (x_j - xh_j).detach()
    u_j = alpha * xj_conn + (1 - alpha) * xj_conn.detach()
    xh_0 = xj_conn - j * model(u_j, j.expand(x_k.shape[0]))
    x0_conn = xh_0 + (x_0 - xh_0).detach()
    d_j = (x_j - xh_j).detach().abs().flatten(1).mean(1)
    d_0 = (x_0 - xh_0).detach().abs().flatten(1).mean(1)
    w = 1.0 / (torch.maximum(d_j, torch.full_like(d_j, tau)) + torch.maximum(d_0, torch.full_like(d_0, tau)))
    loss = (w * torch.relu(lam - _reward(_decode(x0_conn), None))).mean()
    return loss, d_j, d_0, w


@pytest.mark.parametrize("tau", [1e-4, 0.01, 10.0])
@pytest.mark.parametrize("reward_first", [True, False])
def test_leapalign_equals_an_independent_float64_oracle(reward_first, tau):
    """The distances are returned and the similarity weight computed in float32 (the latents are subtracted in
    float64 first: float64 inputs take the reference path), so loss and gradient agree to float32 round-off of the
    weight (relative 2e-6), not 1e-12. tau = 10 clamps both distances: the weight is exactly 1 / (2 tau)."""
    torch.manual_seed(7)
    N, B = 6, 3
    model = MLPVelocity(channels=6).double()
    params = list(model.parameters())
    sigmas = torch.linspace(1.0, 0.0, N + 1, dtype=torch.float64) ** 1.3
    noise = torch.randn(B, 5, 6, dtype=torch.float64)
    alpha, lam = 0.3, 2.0
    gen = torch.Generator().manual_seed(11)
    inputs = StepInputs(model, noise, sigmas, _decode, _reward, ["p"] * B, gen)
    out = leapalign_loss(inputs, alpha, tau, lam, (0, N), reward_first=reward_first)
    got = torch.autograd.grad(out.loss, params)
    a, b = draw_two_indices(0, N, torch.Generator().manual_seed(11))
    want_loss, d_j, d_0, w = _independent_oracle(model, noise, sigmas, a, b, alpha, tau, lam)
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(out.loss, want_loss, rtol=2e-6, atol=0)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=2e-6, atol=2e-6 * float(e.abs().max()))
    assert out.metrics["d_j"] == pytest.approx(float(d_j.mean()), rel=1e-6)
    assert out.metrics["d_0"] == pytest.approx(float(d_0.mean()), rel=1e-6)
    if tau == 10.0:
        assert torch.equal(w, torch.full_like(w, 1 / 20))


def test_the_independent_oracle_notices_a_wrong_discount():
    torch.manual_seed(7)
    model = MLPVelocity(channels=6).double()
    sigmas = torch.linspace(1.0, 0.0, 7, dtype=torch.float64) ** 1.3
    noise = torch.randn(3, 5, 6, dtype=torch.float64)
    inputs = StepInputs(model, noise, sigmas, _decode, _reward, ["p"] * 3, torch.Generator().manual_seed(11))
    out = leapalign_loss(inputs, 0.3, 0.01, 2.0, (0, 6))
    got = torch.autograd.grad(out.loss, list(model.parameters()))
    a, b = draw_two_indices(0, 6, torch.Generator().manual_seed(11))
    wrong, *_ = _independent_oracle(model, noise, sigmas, a, b, 0.35, 0.01, 2.0)  # alpha off by 0.05
    want = torch.autograd.grad(wrong, list(model.parameters()))
    assert max(float((g - e).abs().max()) for g, e in zip(got, want)) > 1e-6


@pytest.mark.parametrize("reward_first", [True, False])
def test_leapalign_on_tiny_flux_matches_oracle(reward_first):
    from leapalign_fast.models.flux import FluxVelocity, TinyFluxConfig, build_tiny_flux, latent_image_ids

    comps = build_tiny_flux(TinyFluxConfig(), seed=0)
    tr = comps.transformer
    params = [p for p in tr.parameters()]
    B, N = 2, 5
    velocity = FluxVelocity(tr, torch.randn(B, 8, 32), torch.randn(B, 32), latent_image_ids(4, 4), 3.5)
    noise = torch.randn(B, 4, 64)
    from leapalign_fast.flow import flux_schedule

    sigmas = flux_schedule(N, 4)
    out = leapalign_loss(
        StepInputs(velocity, noise, sigmas, _decode, _reward, ["p"] * B, torch.Generator().manual_seed(3)),
        0.3,
        0.1,
        2.0,
        (0, N),
        reward_first=reward_first,
    )
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    a, b = draw_two_indices(0, N, torch.Generator().manual_seed(3))
    want_loss, _ = _oracle_loss(velocity, noise, sigmas, a, b, 0.3, 0.1, 2.0)
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_index_draws_are_distinct_sorted_and_cover_window():
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(400):
        a, b = draw_two_indices(2, 6, gen)
        assert 2 <= a < b < 6
        seen.add((a, b))
    assert seen == {(a, b) for a in range(2, 6) for b in range(a + 1, 6)}


@pytest.mark.parametrize("window", [[0, 9], [-1, 4], [3, 4], [5], [4, 2]])
def test_bad_window_is_a_user_error(window):
    with pytest.raises(UserError, match="index_window"):
        resolve_window(window, 8)


def test_window_default_is_whole_trajectory():
    assert resolve_window([], 8) == (0, 8)
    assert resolve_window([1, 3], 8) == (1, 3)


class _Marked(torch.autograd.Function):
    """Identity that records, when its backward runs, how many grad-enabled model forwards had run by then."""

    @staticmethod
    def forward(ctx, x, counted, seen):
        ctx.counted, ctx.seen = counted, seen
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.seen.append(ctx.counted.grad_calls)
        return grad, None, None


@pytest.mark.parametrize("reward_first, grad_forwards_before_decode_backward", [(True, 0), (False, 2)])
def test_reward_first_runs_the_decode_backward_before_the_grad_forwards(
    reward_first, grad_forwards_before_decode_backward
):
    """The memory claim of the reward-first order: the decode + reward backward is over before the leap's two
    grad forwards exist (in the trajectory order both transformer graphs are held during it)."""
    torch.manual_seed(0)
    N, B = 6, 2
    counted = Counting(MLPVelocity(channels=6).double())
    seen: list[int] = []
    decode = lambda x: _decode(_Marked.apply(x, counted, seen))  # noqa: E731
    noise = torch.randn(B, 5, 6, dtype=torch.float64)
    sigmas = torch.linspace(1.0, 0.0, N + 1, dtype=torch.float64)
    inp = StepInputs(counted, noise, sigmas, decode, _reward, ["p"] * B, torch.Generator().manual_seed(1))
    out = leapalign_loss(inp, 0.3, 0.1, 5.0, (0, N), reward_first=reward_first)
    out.loss.backward()
    assert seen == [grad_forwards_before_decode_backward] and counted.grad_calls == 2


def test_both_orders_train_the_same_weights(tmp_path):
    """Three trainer steps of the library default (random tiny FLUX, VAE, colour reward) in each order: the same
    losses and weights up to float round-off (the orders differ only in the connector's `xh + (x - xh)`)."""
    from safetensors.torch import load_file

    from leapalign_fast.config import load_config
    from leapalign_fast.train import train

    base = [
        "max_steps=3",
        "checkpoint_every=3",
        "batch_size=2",
        "num_steps=5",
        "report_to=none",
        "lr=1e-3",
        "deterministic=true",
        "model.checkpoint_decode=true",
    ]
    runs = {}
    for order in ("true", "false"):
        out = tmp_path / order
        train(load_config(None, [f"output_dir={out}", f"method.reward_first={order}", *base]))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[order] = rows, load_file(str(out / "checkpoints" / "step_00000003" / "trained.safetensors"))
    (rows_a, w_a), (rows_b, w_b) = runs["true"], runs["false"]
    assert [r["loss"] for r in rows_a] == pytest.approx([r["loss"] for r in rows_b], rel=1e-4, abs=1e-6)
    assert any(r["loss"] > 0 for r in rows_a)
    assert {(r["grad_forwards"], r["reforwards"]) for r in rows_a} == {(2.0, 2.0)}  # the leap re-runs its forwards
    assert {(r["grad_forwards"], r["reforwards"]) for r in rows_b} == {(2.0, 0.0)}
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-4, atol=1e-5)
    assert w_a.keys() == w_b.keys()


def test_preflight_counts_the_larger_of_decode_and_leap_in_reward_first_order():
    from leapalign_fast.config import load_config
    from leapalign_fast.models.backbone import get_backbone
    from leapalign_fast.models.flux import TinyFluxConfig, build_tiny_flux
    from leapalign_fast.preflight import step_bytes

    comps = build_tiny_flux(TinyFluxConfig(), seed=0)
    need = {}
    for order in (True, False):
        cfg = load_config(None, [f"method.reward_first={str(order).lower()}", "resolution=256"])
        backbone = get_backbone("flux")
        geometry = backbone.geometry(comps, cfg.resolution)
        need[order] = step_bytes(cfg, backbone, comps, geometry)
    assert 0 < need[True] < need[False]


def test_fp16_needs_the_in_trajectory_order():
    from leapalign_fast.config import load_config

    with pytest.raises(UserError, match="method.reward_first=false"):
        load_config(None, ["mixed_precision=fp16"])
    assert not load_config(None, ["mixed_precision=fp16", "method.reward_first=false"]).method.reward_first
    assert load_config(None, ["mixed_precision=fp16", "method.name=refl"]).method.name == "refl"

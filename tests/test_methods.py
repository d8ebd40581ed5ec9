"""Each baseline's gradient vs a direct implementation of the method's defining formula (float64, MLP field)."""

import pytest
import torch
from test_flow import MLPVelocity
from test_leapalign import Counting, _decode, _reward

from leapalign_fast import config
from leapalign_fast.methods import METHODS, build_method, method_settings
from leapalign_fast.methods.base import StepInputs
from leapalign_fast.methods.drtune import draw_early_stop, draw_equally_spaced
from leapalign_fast.sampler import sample_trajectory

N, B, LAM = 6, 3, 2.0


def load_config(*args):
    """A config with its `[method]` table built into the method's settings, as train and the CLI see it."""
    return config.load_config(*args)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = MLPVelocity(channels=6).double()
    sigmas = torch.linspace(1.0, 0.0, N + 1, dtype=torch.float64) ** 1.5
    noise = torch.randn(B, 5, 6, dtype=torch.float64)
    return model, list(model.parameters()), sigmas, noise


def _run(name, model, sigmas, noise, seed=7, **kw):
    counted = Counting(model)
    fn = build_method(method_settings(name, lam=LAM, **kw), N)
    out = fn(StepInputs(counted, noise, sigmas, _decode, _reward, ["p"] * B, torch.Generator().manual_seed(seed)))
    return out, counted


def _hinge(x0):
    return torch.relu(LAM - _reward(_decode(x0), None)).mean()


def _plain_with_grad(model, x, sigmas, start, stop):
    for i in range(start, stop):
        x = x - (sigmas[i] - sigmas[i + 1]) * model(x, sigmas[i].expand(B))
    return x


def _states(model, sigmas, noise):
    return sample_trajectory(model, noise, sigmas, keep_states=True).states


def _close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_equals_autograd_through_the_plain_sampler(setup, checkpointing):
    model, params, sigmas, noise = setup
    out, counted = _run("full", model, sigmas, noise, checkpointing=checkpointing)
    assert counted.grad_calls == N
    got = torch.autograd.grad(out.loss, params)
    assert counted.grad_calls == (2 * N if checkpointing else N)  # checkpointing re-runs each forward
    want = torch.autograd.grad(_hinge(_plain_with_grad(model, noise, sigmas, 0, N)), params)
    _close(got, want)


@pytest.mark.parametrize("k", [1, 3])
def test_draft_k_backprops_through_the_last_k_steps(setup, k):
    model, params, sigmas, noise = setup
    out, counted = _run("draft", model, sigmas, noise, draft_k=k)
    got = torch.autograd.grad(out.loss, params)
    assert counted.calls == N and counted.grad_calls == k
    x = _states(model, sigmas, noise)[N - k]
    _close(got, torch.autograd.grad(_hinge(_plain_with_grad(model, x, sigmas, N - k, N)), params))


@pytest.mark.parametrize(
    "kw, count",
    [({}, 3), ({"late_steps": 2}, 2), ({"late_fraction": 1.0}, N)],
    ids=["published", "late_steps", "whole"],
)
def test_refl_one_step_prediction_at_a_late_step(setup, kw, count):
    model, params, sigmas, noise = setup
    out, counted = _run("refl", model, sigmas, noise, seed=11, **kw)  # published: round(0.44 * 6) = 3 steps
    got = torch.autograd.grad(out.loss, params)
    i = N - 1 - int(torch.randint(count, (1,), generator=torch.Generator().manual_seed(11)))
    assert out.metrics["t"] == pytest.approx(float(sigmas[i])) and counted.calls == i + 1 and counted.grad_calls == 1
    x_t = _states(model, sigmas, noise)[i]
    x0 = x_t - sigmas[i] * model(x_t, sigmas[i].expand(B))
    _close(got, torch.autograd.grad(_hinge(x0), params))


def test_draft_lv_averages_the_last_step_and_renoisings(setup):
    model, params, sigmas, noise = setup
    out, _ = _run("draft_lv", model, sigmas, noise, renoise=2, seed=5)
    got = torch.autograd.grad(out.loss, params)
    x = _states(model, sigmas, noise)[N - 1]
    x0 = _plain_with_grad(model, x, sigmas, N - 1, N)
    s, g = sigmas[N - 1], torch.Generator().manual_seed(5)
    losses = [_hinge(x0)]
    for _ in range(2):
        x_s = (1 - s) * x0.detach() + s * torch.randn(x0.shape, generator=g).double()
        losses.append(_hinge(x_s - s * model(x_s, s.expand(B))))
    _close(got, torch.autograd.grad(torch.stack(losses).mean(), params))


def test_refl_published_count_scales_with_n():
    assert [method_settings("refl").count(n) for n in (25, 50, 8, 1)] == [11, 22, 4, 1]  # 11 of 25 published


def test_drtune_uniform_variant_has_no_nested_terms(setup):
    model, params, sigmas, noise = setup
    out, counted = _run("drtune", model, sigmas, noise, variant="uniform", drtune_steps=3, seed=3)
    got = torch.autograd.grad(out.loss, params)
    picks = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:3].tolist()
    assert counted.calls == N and counted.grad_calls == 3
    states = _states(model, sigmas, noise)
    x0 = states[-1].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_hinge(x0), x0)  # dL/dx_0 at the real x_0
    # dx_0/dtheta = -sum_i dt_i dv(x_i)/dtheta over trained steps only: no dv/dx products.
    want = [torch.zeros_like(p) for p in params]
    for i in picks:
        v = model(states[i], sigmas[i].expand(B))
        for acc, d in zip(want, torch.autograd.grad(-(sigmas[i] - sigmas[i + 1]) * (g * v).sum(), params)):
            acc += d
    _close(got, want)


@pytest.mark.parametrize("seed", [3, 4, 9])
def test_drtune_published_early_stop_and_equally_spaced_steps(setup, seed):
    """-sum_{i in T, i < e} dt_i dv(x_i) - [e in T] t_e dv(x_e), applied to dL/dx0_pred at the one-step prediction."""
    model, params, sigmas, noise = setup
    out, counted = _run("drtune", model, sigmas, noise, seed=seed)  # K = 3, early stop among the last round(0.4 N)
    got = torch.autograd.grad(out.loss, params)
    g = torch.Generator().manual_seed(seed)
    e = N - int(torch.randint(1, round(0.4 * N) + 1, (1,), generator=g))
    stride = (e + 1) // 3
    start = int(torch.randint(0, e - 2 * stride + 1, (1,), generator=g))
    picks = [start, start + stride, start + 2 * stride]
    assert out.metrics["early_stop"] == e and counted.calls == e + 1 and counted.grad_calls == 3
    states = _states(model, sigmas, noise)
    x_e = states[e]
    x0_pred = (x_e - sigmas[e] * model(x_e, sigmas[e].expand(B))).detach().requires_grad_(True)
    (gx,) = torch.autograd.grad(_hinge(x0_pred), x0_pred)
    want = [torch.zeros_like(p) for p in params]
    for i in picks:
        coef = sigmas[e] if i == e else sigmas[i] - sigmas[i + 1]
        v = model(states[i], sigmas[i].expand(B))
        for acc, d in zip(want, torch.autograd.grad(-coef * (gx * v).sum(), params)):
            acc += d
    _close(got, want)


def test_drtune_draws_match_the_published_ranges():
    g = torch.Generator().manual_seed(0)
    es = [draw_early_stop(25, 0.4, g) for _ in range(300)]
    assert set(es) == set(range(15, 25))  # the last 40% of 25 steps
    assert draw_early_stop(25, 0.0, g) == 24
    for total in range(1, 26):
        for _ in range(5):
            picks = draw_equally_spaced(total, 3, g)
            assert len(set(picks)) == min(3, total) and 0 <= min(picks) and max(picks) < total
            assert len({b - a for a, b in zip(picks, picks[1:])}) <= 1  # equally spaced


def test_unknown_method_names_the_known_ones():
    from leapalign_fast.errors import UserError

    with pytest.raises(UserError, match="known methods: " + ", ".join(sorted(METHODS))):
        build_method(method_settings("leapalign").__class__(name="dpo"), N)


PUBLISHED_BATCH = {"refl": 4, "draft_lv": 4, "drtune": 4, "flowbp_sparse": 4, "flowbp_bridge": 8, "flowbp_lagrange": 8}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BATCH))
def test_flux_configs_hold_the_published_settings(name):
    """configs/flux_<method>.toml: FlowBP's FLUX.1 settings, and the method's defaults are the published ones."""
    import dataclasses
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / f"flux_{name}.toml")
    got = (
        cfg.resolution,
        cfg.num_steps,
        cfg.guidance,
        cfg.batch_size,
        cfg.lr,
        cfg.weight_decay,
        cfg.ema_decay,
        cfg.max_grad_norm,
        cfg.max_steps,
    )
    assert got == (512, 25, 4.0, PUBLISHED_BATCH[name], 1e-5, 1e-4, 0.995, 1.0, 300)
    assert cfg.mixed_precision == "bf16" and not cfg.lora.enabled and cfg.reward.name == "hpsv2.1"
    assert cfg.method.name == name and cfg.method.lam == 0.55
    assert dataclasses.replace(cfg.method, lam=1.0) == method_settings(name)  # the defaults are the published setting


def test_method_table_builds_the_chosen_methods_settings(tmp_path):
    from leapalign_fast.config import config_toml
    from leapalign_fast.errors import UserError

    cfg = load_config(None, ["method.name=refl", "method.alpha=0.5", "method.late_steps=3"])  # alpha: not refl's
    assert cfg.method == method_settings("refl", late_steps=3) and not hasattr(cfg.method, "alpha")
    (tmp_path / "c.toml").write_text(config_toml(cfg))
    assert load_config(tmp_path / "c.toml") == cfg  # the saved config reads back as the same settings
    with pytest.raises(UserError) as err:
        load_config(None, ["num_steps=1"])  # LeapAlign needs two steps; no other method's key is named
    assert "num_steps >= 2" in str(err.value) and "late_steps" not in str(err.value)
    with pytest.raises(UserError, match=r"method.late_steps must be in \[0, num_steps=4\]"):
        load_config(None, ["method.name=refl", "method.late_steps=9", "num_steps=4"])
    with pytest.raises(UserError, match="key 'method.num_active_step'; did you mean 'method.num_active_steps'"):
        load_config(None, ["method.name=flowbp_sparse", "method.num_active_step=2"])
    with pytest.raises(UserError, match="'method.support_scale' must be a float"):
        load_config(None, ["method.name=flowbp_lagrange", "method.support_scale='x'"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_grad_graphs_bounds_the_grad_enabled_forwards(setup, name):
    """The memory preflight's count of kept grad forwards is an upper bound on what each method runs with grad."""
    model, _, sigmas, noise = setup
    bound = method_settings(name).grad_graphs(N)
    for seed in range(6):
        _, counted = _run(name, model, sigmas, noise, seed=seed)
        assert 0 < counted.grad_calls <= bound, (name, seed, counted.grad_calls, bound)

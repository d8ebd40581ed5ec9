"""FlowBP-Sparse, -Bridge and -Lagrange (arXiv 2606.11075) vs direct float64 implementations of their defining
formulas (gradient w.r.t. the parameters for fixed draws, MLP field), and the (k, j) index samplers."""

import numpy as np
import pytest
import torch
from test_flow import MLPVelocity
from test_leapalign import Counting, _decode, _reward

from leapalign_fast.errors import UserError
from leapalign_fast.methods import build_method, method_settings
from leapalign_fast.methods.base import StepInputs
from leapalign_fast.methods.flowbp_bridge import draw_bridge, split_active
from leapalign_fast.methods.flowbp_lagrange import active_supports, interval_supports, quadrature_weights
from leapalign_fast.methods.indices import draw_dirichlet_pair, draw_late_biased, draw_pair
from leapalign_fast.sampler import sample_trajectory

N, B, LAM = 8, 3, 2.0


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = MLPVelocity(channels=6).double()
    sigmas = torch.linspace(1.0, 0.0, N + 1, dtype=torch.float64) ** 1.5
    noise = torch.randn(B, 5, 6, dtype=torch.float64)
    states = sample_trajectory(model, noise, sigmas, keep_states=True).states
    return model, list(model.parameters()), sigmas, noise, states


def _run(name, model, sigmas, noise, seed, **kw):
    counted = Counting(model)
    fn = build_method(method_settings(name, lam=LAM, **kw), N)
    out = fn(StepInputs(counted, noise, sigmas, _decode, _reward, ["p"] * B, torch.Generator().manual_seed(seed)))
    return out, counted, torch.autograd.grad(out.loss, list(model.parameters()))


def _dx0(x0, weight=None):
    """dL/dx_0 at the real x_0 for L = mean(W max(0, lam - r))."""
    x0 = x0.detach().clone().requires_grad_(True)
    h = torch.relu(LAM - _reward(_decode(x0), None))
    return torch.autograd.grad((h if weight is None else weight * h).mean(), x0)[0]


class Field:
    """Vector-Jacobian products of v at the trajectory's states: J_theta(v_i)^T c and J_x(v_i)^T c."""

    def __init__(self, model, sigmas, states):
        self.model, self.sigmas, self.states = model, sigmas, states
        self.params = list(model.parameters())

    def _v(self, i, x=None):
        return self.model(self.states[i] if x is None else x, self.sigmas[i].expand(B))

    def vjp_theta(self, i, c):
        return torch.autograd.grad((self._v(i) * c).sum(), self.params)

    def vjp_x(self, i, c):
        x = self.states[i].clone().requires_grad_(True)
        return torch.autograd.grad((self._v(i, x) * c).sum(), x)[0]

    def value(self, i):
        with torch.no_grad():
            return self._v(i)


def _sum_grads(parts):
    return [sum(ps) for ps in zip(*parts)]


def _close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in got)


SPARSE_CASES = [(1, {}), (2, {"grad_rescale": 0.0}), (3, {"num_active_steps": 5, "late_bias": 0.0})]


@pytest.mark.parametrize("seed, kw", SPARSE_CASES)
def test_sparse_is_the_euler_weighted_sum_of_k_active_steps(setup, seed, kw):
    model, params, sigmas, noise, states = setup
    out, counted, got = _run("flowbp_sparse", model, sigmas, noise, seed, **kw)
    s = method_settings("flowbp_sparse", **kw)
    active = draw_late_biased(0, N, s.num_active_steps, s.late_bias, torch.Generator().manual_seed(seed))
    assert counted.calls == N and counted.grad_calls == len(active) == out.metrics["grad_forwards"]
    dt = (sigmas[:-1] - sigmas[1:]).tolist()
    f = 1 + s.grad_rescale * (sum(dt) / sum(dt[i] for i in active) - 1)
    F, g = Field(model, sigmas, states), _dx0(states[-1])
    want = _sum_grads([[-f * dt[i] * d for d in F.vjp_theta(i, g)] for i in active])  # -f sum_S dt_i dv_i/dtheta
    _close(got, want)
    torch.testing.assert_close(out.x0, states[-1], rtol=0, atol=0)  # the real trajectory


BRIDGE_CASES = [
    (1, {}),
    (5, {"alpha": 0.7, "grad_rescale": 0.0}),
    (6, {"index_sampler": "dirichlet"}),
    (8, {"num_active_steps": 2}),
]


@pytest.mark.parametrize("seed, kw", BRIDGE_CASES)
def test_bridge_adds_one_nested_path_through_x_j(setup, seed, kw):
    model, params, sigmas, noise, states = setup
    out, counted, got = _run("flowbp_bridge", model, sigmas, noise, seed, **kw)
    s = method_settings("flowbp_bridge", **kw)
    gen = torch.Generator().manual_seed(seed)
    _, j = draw_pair(s, N, gen)
    pre, post = draw_bridge(N, j, s, gen)
    assert j in post and all(i < j for i in pre) and all(i >= j for i in post) and len(pre) >= 1
    assert counted.calls == N and counted.grad_calls == len(pre) + len(post) == min(s.num_active_steps, N)
    dt = (sigmas[:-1] - sigmas[1:]).tolist()
    f = 1 + s.grad_rescale * (sum(dt) / sum(dt[i] for i in pre + post) - 1)
    F, g = Field(model, sigmas, states), _dx0(states[-1])
    # -f sum_{P u Q} dt_i dv_i/dtheta + alpha f^2 dt_j (dv_j/dx)^T-weighted sum_P dt_i dv_i/dtheta
    c = -f * dt[j] * s.alpha * F.vjp_x(j, g)
    direct = [[-f * dt[i] * d for d in F.vjp_theta(i, g)] for i in pre + post]
    nested = [[-f * dt[i] * d for d in F.vjp_theta(i, c)] for i in pre]
    _close(got, _sum_grads(direct + nested))
    torch.testing.assert_close(out.x0, states[-1], rtol=0, atol=0)


def _quadrature_reference(times, t0, t1):
    """Weights exact on polynomials of degree < len(times): sum_p w_p t_p^m = (t1^(m+1) - t0^(m+1)) / (m + 1)."""
    t = np.asarray(times, dtype=np.float64)
    m = np.arange(len(t))
    return np.linalg.solve(t[None, :] ** m[:, None], (t1 ** (m + 1) - t0 ** (m + 1)) / (m + 1))


def test_lagrange_weights_supports_and_active_sets():
    times = [0.9, 0.7, 0.45]
    np.testing.assert_allclose(
        quadrature_weights(times, 0.9, 0.2, "lagrange"), _quadrature_reference(times, 0.9, 0.2), rtol=1e-12
    )
    assert quadrature_weights([0.8], 0.8, 0.3, "lagrange") == pytest.approx([-0.5])  # one support: Euler
    assert quadrature_weights(times, 0.9, 0.3, "uniform") == pytest.approx([-0.2] * 3)
    assert interval_supports(0, 6, 3) == [0, 2, 5] and interval_supports(3, 5, 3) == [3, 4]
    assert interval_supports(4, 25, 3) == [4, 14, 24] and interval_supports(7, 8, 3) == [7]
    assert active_supports([3, 5, 8], "midpoint", 2) == [3, 5] and active_supports([3, 5, 8], "all", 2) == [3, 5]
    assert active_supports([3, 5, 8], "all", 0) == [3, 5, 8] and active_supports([3, 5, 8], "start", 0) == [3]


LAGRANGE_CASES = [
    (1, {}),
    (2, {"index_sampler": "uniform"}),
    (4, {"anchor_lambda": 0.6, "alpha": 0.5}),
    (5, {"support_mode": "all", "max_active_supports": 0, "grad_rescale": 1.0, "connector_order": 4}),
    (7, {"weight_scheme": "uniform", "support_mode": "start"}),
    (9, {"tau": 1e-4}),  # distances above the floor: the similarity weight varies per sample
]


@pytest.mark.parametrize("seed, kw", LAGRANGE_CASES)
def test_lagrange_is_two_quadrature_leaps_with_a_nested_term(setup, seed, kw):
    model, params, sigmas, noise, states = setup
    out, counted, got = _run("flowbp_lagrange", model, sigmas, noise, seed, **kw)
    s = method_settings("flowbp_lagrange", **kw)
    a, b = draw_pair(s, N, torch.Generator().manual_seed(seed))
    t = sigmas.tolist()
    F = Field(model, sigmas, states)

    def interval(start, end):
        sup = interval_supports(start, end, s.connector_order)
        w = (
            _quadrature_reference([t[p] for p in sup], t[start], t[end])
            if s.weight_scheme == "lagrange"
            else [(t[end] - t[start]) / len(sup)] * len(sup)
        )
        act = active_supports(sup, s.support_mode, s.max_active_supports)
        f = 1 + s.grad_rescale * (sum(abs(x) for x in w) / sum(abs(w[sup.index(p)]) for p in act) - 1)
        return sup, dict(zip(sup, w)), act, f

    sup_kj, w_kj, act_kj, f_kj = interval(a, b)
    sup_j0, w_j0, act_j0, f_j0 = interval(b, N)
    assert counted.calls == N and counted.grad_calls == len(act_kj) + len(act_j0)
    lam_a = s.anchor_lambda
    # values: xh_j, xh_0 and the similarity weight
    lagr_j = states[a] + sum(w_kj[p] * F.value(p) for p in sup_kj)
    xh_j = (1 - lam_a) * (states[a] + (t[b] - t[a]) * F.value(a)) + lam_a * lagr_j
    xh_0 = states[b] + sum(w_j0[p] * F.value(p) for p in sup_j0)
    d_j = (states[b] - xh_j).abs().mean(dim=(1, 2))
    d_0 = (states[-1] - xh_0).abs().mean(dim=(1, 2))
    assert out.metrics["d_j"] == pytest.approx(float(d_j.mean()), rel=1e-5)  # distances are float32 (kernels)
    assert out.metrics["d_0"] == pytest.approx(float(d_0.mean()), rel=1e-5)
    W = 1 / (d_j.float().clamp_min(s.tau) + d_0.float().clamp_min(s.tau))  # float32, as the kernel
    g = _dx0(states[-1], W)

    def c(p, start):  # support gradient scale: non-start active supports scaled by support_scale
        return 1.0 if p == start else s.support_scale

    # interval j -> 0: sum over its active supports; h = dL/dx_j' = g + f_j0 w_j alpha (dv_j/dx)^T g
    parts = [[f_j0 * c(p, b) * w_j0[p] * d for d in F.vjp_theta(p, g)] for p in act_j0]
    h = g + (f_j0 * w_j0[b] * s.alpha * F.vjp_x(b, g) if b in act_j0 else 0)
    # interval k -> j: the anchor's unscaled Euler term on v(x_k) plus lam_a times the scaled quadrature terms
    parts += [[(1 - lam_a) * (t[b] - t[a]) * d for d in F.vjp_theta(a, h)]] if lam_a < 1 else []
    parts += [[lam_a * f_kj * c(p, a) * w_kj[p] * d for d in F.vjp_theta(p, h)] for p in act_kj]
    if s.tau < 1e-3:  # the weight comes from float32 distances, summed in another order here
        for x, y in zip(got, _sum_grads(parts)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6 * float(y.abs().max()))
    else:
        _close(got, _sum_grads(parts))


def test_dirichlet_pair_stays_in_the_window_and_follows_the_concentrations():
    g = torch.Generator().manual_seed(0)
    pairs = [draw_dirichlet_pair(0, 25, [2.5, 6.0, 2.0], g) for _ in range(2000)]
    assert all(0 <= a < b < 24 for a, b in pairs)  # at least one step after j and one before k
    a, b = np.array(pairs).T
    # run lengths 24 - b (after j), b - a (gap), a + 1 (k and before); expected n * conc / sum(conc):
    # 25 * (2.5, 6, 2) / 10.5 = after j 5.95, gap 14.3, before k 4.76
    assert abs((24 - b).mean() - 25 * 2.5 / 10.5) < 0.5 and abs((b - a).mean() - 25 * 6 / 10.5) < 0.5
    assert abs((a + 1).mean() - 25 * 2 / 10.5) < 0.5  # k = (steps before k) - 1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [draw_dirichlet_pair(2, 9, [1.0, 1.0, 1.0], g1) for _ in range(20)] == [
        draw_dirichlet_pair(2, 9, [1.0, 1.0, 1.0], g2) for _ in range(20)
    ]


def test_late_biased_draws_favour_the_clean_end():
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(25)
    for _ in range(600):
        picks = draw_late_biased(0, 25, 3, 2.0, g)
        assert len(set(picks)) == 3 and picks == sorted(picks)
        counts[picks] += 1
    assert counts[-5:].sum() > 4 * counts[:5].sum()
    assert draw_late_biased(3, 5, 4, 2.0, g) == [3, 4]


def test_bridge_split_keeps_one_active_step_each_side():
    assert split_active(5, 12, 13) == (2, 3) and split_active(5, 1, 24) == (1, 4) and split_active(5, 24, 1) == (4, 1)
    assert split_active(2, 3, 3) == (1, 1) and split_active(9, 2, 3) == (2, 3)


def test_leapalign_takes_the_dirichlet_sampler(setup):
    model, params, sigmas, noise, states = setup
    out, counted, _ = _run("leapalign", model, sigmas, noise, 4, index_sampler="dirichlet")
    a, b = draw_dirichlet_pair(0, N, [2.5, 6.0, 2.0], torch.Generator().manual_seed(4))
    assert out.metrics["k"] == pytest.approx(float(sigmas[a])) and out.metrics["j"] == pytest.approx(float(sigmas[b]))
    assert counted.calls == N + 2 and counted.grad_calls == 2  # reward first: the leap re-runs its two forwards


@pytest.mark.parametrize(
    "name, override, key",
    [
        ("flowbp_sparse", {"num_active_steps": 0}, "method.num_active_steps"),
        ("flowbp_bridge", {"num_active_steps": 1}, "method.num_active_steps"),
        ("flowbp_lagrange", {"support_mode": "none"}, "method.support_mode"),
        ("flowbp_lagrange", {"anchor_lambda": 2.0}, "method.anchor_lambda"),
        ("leapalign", {"index_sampler": "beta"}, "method.index_sampler"),
        ("leapalign", {"dirichlet_alpha": [1.0, 0.0, 1.0]}, "method.dirichlet_alpha"),
    ],
)
def test_bad_settings_name_the_key(name, override, key):
    with pytest.raises(UserError, match=key):
        build_method(method_settings(name, **override), N)

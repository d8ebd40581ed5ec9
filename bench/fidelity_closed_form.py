"""The gradient-fidelity harness's own check: a flow whose gradients are known in closed form.

The velocity is linear in the latent, `v(x, t) = x W^T + b + t c` (`LinearVelocity`, a torch module with W, b, c
trainable), the decode is the identity and the reward is quadratic, `r(x) = -mean((x - y)^2)` (`QuadraticReward`),
so with `lam > 0` every hinge `max(0, lam - r)` is active and smooth. An Euler step is then affine,
`x_{i+1} = x_i M_i - h_i (b + t_i c)` with `M_i = I - h_i W^T` and `h_i = t_i - t_{i+1}`, the trajectory is a
product of matrices, and the gradient of any of the methods' surrogates is a short formula in numpy float64, written
here without autograd:

- `vjp(L, x, t)`: the parameters' gradient of one velocity call `v(x, t)` contracted with a cotangent L
  (dW = L^T x summed over rows, db = sum L, dc = t sum L); `L W` is the cotangent pushed through dv/dx.
- full backprop: `g = -sum_i h_i vjp(G P_{i+1}, x_i, t_i)`, with G = dloss/dx_0 and
  `P_{i+1} = (I - h_{N-1} W) ... (I - h_{i+1} W)` the product of the later steps' Jacobians.
- each surrogate: which calls get gradient, their coefficients, which nested (dv/dx) terms survive and the reward's
  point, as that method's docstring states it (`surrogate_gradient`), for one draw of its randomness (`replay_draw`
  reads the draw off a copy of the generator, with the method's own index samplers);
- and each method's expected gradient over its randomness (`expected_gradient`): a sum over the draws' outcomes
  with their probabilities (uniform pairs, late-biased sets without replacement, DRTune's early stop and offset),
  or, for DRaFT-LV's Gaussian re-noising, the closed-form mean of a quadratic in the noise. None where the
  distribution has no closed form (Dirichlet-shaped pairs).

tests/test_gradient_fidelity.py checks the methods' loss builders (the same ones the trainer calls) against these
formulas: `full` to float64 round-off, every surrogate draw by draw, the harness's mean over draws against the
expectation, and that a perturbed coefficient (alpha, K, the rescale) is caught.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from leapalign_fast.methods.base import StepInputs

F32 = np.float32


class LinearVelocity(torch.nn.Module):
    """`v(x, t) = x W^T + b + t c` over the channel axis of (B, L, C) latents; W, b, c trainable."""

    def __init__(self, channels: int, scale: float = 0.5, generator: torch.Generator | None = None):
        super().__init__()
        g = generator or torch.Generator().manual_seed(0)
        c = channels
        self.W = torch.nn.Parameter(scale * torch.randn(c, c, generator=g, dtype=torch.float64) / math.sqrt(c))
        self.b = torch.nn.Parameter(0.3 * torch.randn(c, generator=g, dtype=torch.float64))
        self.c = torch.nn.Parameter(0.3 * torch.randn(c, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.W.T + self.b + t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) * self.c


class QuadraticReward(torch.nn.Module):
    """`r(x) = -mean((x - y)^2)` per sample over (L, C): a reward on the latent itself (the decode is the identity)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -(images - self.target).square().mean(dim=(1, 2))


def identity_decode(x: torch.Tensor) -> torch.Tensor:
    return x


def closed_form_inputs(
    model: LinearVelocity, reward: QuadraticReward, noise: torch.Tensor, sigmas: torch.Tensor, generator
) -> StepInputs:
    """The methods' StepInputs for the linear flow (what Trainer.step_inputs builds for a real backbone)."""
    return StepInputs(model, noise, sigmas, identity_decode, reward, ["closed form"] * noise.shape[0], generator)


@dataclass
class LinearFlow:
    """The formulas, in numpy float64: the linear flow's parameters, the fixed noise, the schedule and the reward."""

    W: np.ndarray  # (C, C)
    b: np.ndarray  # (C,)
    c: np.ndarray  # (C,)
    noise: np.ndarray  # (B, L, C)
    t: np.ndarray  # (N + 1,) times, 1 ... 0
    y: np.ndarray  # (L, C) reward target
    lam: float

    @classmethod
    def of(cls, model: LinearVelocity, reward: QuadraticReward, noise, sigmas, lam: float) -> LinearFlow:
        arr = lambda x: x.detach().double().numpy().copy()
        return cls(arr(model.W), arr(model.b), arr(model.c), arr(noise), arr(sigmas), arr(reward.target), lam)

    @property
    def n(self) -> int:
        return len(self.t) - 1

    @property
    def h(self) -> np.ndarray:
        return self.t[:-1] - self.t[1:]

    def v(self, x: np.ndarray, t: float) -> np.ndarray:
        return x @ self.W.T + self.b + t * self.c

    def states(self) -> list[np.ndarray]:
        """x_0 = noise (index 0, t = 1) ... x_N (t = 0): the Euler trajectory."""
        xs = [self.noise]
        for i in range(self.n):
            xs.append(xs[-1] - self.h[i] * self.v(xs[-1], self.t[i]))
        return xs

    def vjp(self, cot: np.ndarray, x: np.ndarray, t: float) -> np.ndarray:
        """Parameters' gradient of <cot, v(x, t)>, flattened as the module's parameters (W, b, c)."""
        s = cot.sum(axis=(0, 1))
        return np.concatenate([np.einsum("blc,bld->cd", cot, x).ravel(), s, t * s])

    def through_x(self, cot: np.ndarray) -> np.ndarray:
        """The cotangent of v's input: <cot, dv/dx . d> = <cot W, d>."""
        return cot @ self.W

    def hinge_grad(self, x0: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        """d/dx0 of mean_s weight_s * max(0, lam - r(x0_s)) with r = -mean((x0 - y)^2)."""
        bsz, length, ch = x0.shape
        r = -np.square(x0 - self.y).mean(axis=(1, 2))
        active = (self.lam - r > 0).astype(np.float64)
        w = np.ones(bsz) if weight is None else weight
        return (w * active)[:, None, None] * (2.0 / (length * ch)) * (x0 - self.y) / bsz

    def full(self) -> np.ndarray:
        """Full-trajectory backprop: -sum_i h_i vjp(G P_{i+1}, x_i, t_i), P_{i+1} the later steps' Jacobians."""
        xs, h, eye = self.states(), self.h, np.eye(len(self.b))
        G = self.hinge_grad(xs[-1])
        grad = np.zeros(self.W.size + 2 * self.b.size)
        for i in range(self.n):
            P = eye
            for m in range(self.n - 1, i, -1):
                P = P @ (eye - h[m] * self.W)
            grad += -h[i] * self.vjp(G @ P, xs[i], self.t[i])
        return grad


def _rescale(h: np.ndarray, active, strength: float) -> float:
    """FlowBP's factor 1 + s (sum of all the weights / sum of the active ones - 1)."""
    tot, act = np.abs(h).sum(), sum(abs(h[i]) for i in active)
    return 1.0 + strength * (tot / act - 1.0) if strength > 0 and act > 1e-8 else 1.0


def _weight(d_j: np.ndarray, d_0: np.ndarray, tau: float) -> np.ndarray:
    """1 / (max(d_j, tau) + max(d_0, tau)) with the distances rounded to float32 and the weight in float32."""
    dj, d0 = d_j.astype(F32), d_0.astype(F32)
    return (F32(1.0) / (np.maximum(dj, F32(tau)) + np.maximum(d0, F32(tau)))).astype(np.float64)


def _mean_abs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).reshape(a.shape[0], -1).mean(axis=1)


def surrogate_gradient(flow: LinearFlow, s, draw: dict) -> np.ndarray:
    """The gradient one draw of method `s.name` gives on the linear flow (see the module docstring)."""
    xs, t, h, n = flow.states(), flow.t, flow.h, flow.n
    name = s.name
    if name == "full":
        return flow.full()
    if name == "draft":
        G, grad, eye = flow.hinge_grad(xs[-1]), 0.0, np.eye(len(flow.b))
        for i in range(n - s.draft_k, n):  # the chain is cut at n - K
            P = eye
            for m in range(n - 1, i, -1):
                P = P @ (eye - h[m] * flow.W)
            grad = grad - h[i] * flow.vjp(G @ P, xs[i], t[i])
        return grad
    if name == "refl":  # the one-step prediction from x_i, reward there
        i = draw["i"]
        pred = xs[i] - t[i] * flow.v(xs[i], t[i])
        return -t[i] * flow.vjp(flow.hinge_grad(pred), xs[i], t[i])
    if name == "draft_lv":  # the mean of 1 + n losses: the last step, and each re-noising predicted back
        i, x0 = n - 1, xs[-1]
        grad = -h[i] * flow.vjp(flow.hinge_grad(x0), xs[i], t[i])
        for eps in draw["eps"]:
            x_t = (1 - t[i]) * x0 + t[i] * eps
            pred = x_t - t[i] * flow.v(x_t, t[i])
            grad = grad - t[i] * flow.vjp(flow.hinge_grad(pred), x_t, t[i])
        return grad / (1 + len(draw["eps"]))
    if name == "drtune":
        picks = draw["picks"]
        if s.variant == "uniform":  # sg(x) at the model input: no nested terms, the reward on the real x_0
            G = flow.hinge_grad(xs[-1])
            return sum(-h[i] * flow.vjp(G, xs[i], t[i]) for i in picks)
        e = draw["e"]
        pred = xs[e] - t[e] * flow.v(xs[e], t[e])
        G = flow.hinge_grad(pred)
        grad = sum((-h[i] * flow.vjp(G, xs[i], t[i]) for i in picks if i < e), np.zeros(flow.W.size + 2 * flow.b.size))
        return grad - t[e] * flow.vjp(G, xs[e], t[e]) if e in picks else grad
    if name == "flowbp_sparse":
        active = draw["active"]
        f = _rescale(h, active, s.grad_rescale)
        G = flow.hinge_grad(xs[-1])
        return sum(-f * h[i] * flow.vjp(G, xs[i], t[i]) for i in active)
    if name == "flowbp_bridge":
        pre, post = draw["pre"], draw["post"]
        j = post[0]
        f = _rescale(h, pre + post, s.grad_rescale)
        G = flow.hinge_grad(xs[-1])
        grad = sum(-f * h[i] * flow.vjp(G, xs[i], t[i]) for i in pre + post)
        nested = flow.through_x(G)  # x_j's gradient reaches v_j's input, scaled by alpha, times -f h_j
        return grad + s.alpha * f * f * h[j] * sum(h[i] * flow.vjp(nested, xs[i], t[i]) for i in pre)
    if name == "leapalign":
        a, b = draw["pair"]
        k, j = t[a], t[b]
        xh_j = xs[a] - (k - j) * flow.v(xs[a], k)
        xh_0 = xs[b] - j * flow.v(xs[b], j)
        w = _weight(_mean_abs(xs[b], xh_j), _mean_abs(xs[-1], xh_0), s.tau)
        G = flow.hinge_grad(xs[-1], w)
        grad = -(k - j) * flow.vjp(G, xs[a], k) - j * flow.vjp(G, xs[b], j)
        return grad + s.alpha * j * (k - j) * flow.vjp(flow.through_x(G), xs[a], k)
    if name == "flowbp_lagrange":
        return _lagrange(flow, s, draw, xs)
    raise ValueError(f"no closed form for method '{name}'")


def _lagrange(flow: LinearFlow, s, draw: dict, xs) -> np.ndarray:
    """FlowBP-Lagrange: two quadrature leaps. The supports, their weights and the active set come from the method's
    `Interval` (its node rule, tested on its own in tests/test_methods_flowbp.py); the gradient is composed here:
    x_0' = xh_j + sum_{p in S_j0} w_p v_p, active v_p with gradient f s_p (s_p = support_scale off the starts), and
    v_j = v(u_j) carrying alpha times xh_j's gradient."""
    from leapalign_fast.methods.flowbp_lagrange import Interval

    a, b = draw["pair"]
    n, t = flow.n, flow.t
    times = t.tolist()
    kj, j0 = Interval.build(a, b, times, s), Interval.build(b, n, times, s)
    lam_a = s.anchor_lambda
    vals = {p: flow.v(xs[p], t[p]) for p in set(kj.supports) | set(j0.supports)}
    lagr = xs[a] + sum(kj.weights[p] * vals[p] for p in kj.supports)
    euler = xs[a] + (t[b] - t[a]) * vals[a]
    xh_j = lagr if lam_a == 1.0 else euler + lam_a * (lagr - euler)
    xh_0 = xs[b] + sum(j0.weights[p] * vals[p] for p in j0.supports)
    w = _weight(_mean_abs(xs[b], xh_j), _mean_abs(xs[-1], xh_0), s.tau)
    G = flow.hinge_grad(xs[-1], w)
    scale = lambda p: 1.0 if p in (a, b) else s.support_scale

    def d_xh_j(cot):  # <cot, d xh_j / d theta>
        out = sum(lam_a * kj.weights[p] * kj.factor * scale(p) * flow.vjp(cot, xs[p], t[p]) for p in kj.active)
        return out + (1 - lam_a) * (t[b] - t[a]) * flow.vjp(cot, xs[a], t[a])

    grad = d_xh_j(G) + sum(j0.weights[p] * j0.factor * scale(p) * flow.vjp(G, xs[p], t[p]) for p in j0.active)
    return grad + s.alpha * j0.weights[b] * j0.factor * d_xh_j(flow.through_x(G))


# -- the draws ---------------------------------------------------------------------------------------------------


def replay_draw(s, n: int, generator: torch.Generator, shape) -> dict:
    """The draw method `s.name` makes from `generator` (pass a copy), in the order its loss module makes it, with
    the method's own index samplers: what the formula needs to know of the method's randomness."""
    from leapalign_fast.methods.drtune import draw_early_stop, draw_equally_spaced
    from leapalign_fast.methods.flowbp_bridge import draw_bridge
    from leapalign_fast.methods.indices import draw_late_biased, draw_pair
    from leapalign_fast.methods.settings import resolve_window

    g = generator
    if s.name in ("full", "draft"):
        return {}
    if s.name == "refl":
        return {"i": n - 1 - int(torch.randint(s.count(n), (1,), generator=g))}
    if s.name == "draft_lv":
        return {"eps": [torch.randn(shape, generator=g).double().numpy() for _ in range(s.renoise)]}
    if s.name == "drtune":
        if s.variant == "uniform":
            lo, hi = resolve_window(s.index_window, n, min_span=1)
            return {"picks": (lo + torch.randperm(hi - lo, generator=g)[: s.drtune_steps]).tolist()}
        e = draw_early_stop(n, s.early_stop_fraction, g)
        return {"e": e, "picks": draw_equally_spaced(e + 1, s.drtune_steps, g)}
    if s.name == "flowbp_sparse":
        return {"active": draw_late_biased(0, n, s.num_active_steps, s.late_bias, g)}
    if s.name == "flowbp_bridge":
        _, j = draw_pair(s, n, g)
        pre, post = draw_bridge(n, j, s, g)
        return {"pre": pre, "post": post}
    if s.name in ("leapalign", "flowbp_lagrange"):
        return {"pair": draw_pair(s, n, g)}
    raise ValueError(f"no draw replay for method '{s.name}'")


def late_biased_sets(lo: int, hi: int, count: int, bias: float) -> list[tuple[list[int], float]]:
    """Every sorted set `draw_late_biased` can return, with its probability: sequential draws without replacement,
    P(i) proportional to (i - lo + 1)^bias among the indices not drawn yet."""
    if count >= hi - lo:
        return [(list(range(lo, hi)), 1.0)]
    w = {i: float(i - lo + 1) ** bias for i in range(lo, hi)}
    probs: dict[tuple[int, ...], float] = {}
    for seq in itertools.permutations(range(lo, hi), count):
        p, left = 1.0, sum(w.values())
        for i in seq:
            p *= w[i] / left
            left -= w[i]
        key = tuple(sorted(seq))
        probs[key] = probs.get(key, 0.0) + p
    return [(list(k), p) for k, p in probs.items()]


def _uniform_pairs(lo: int, hi: int) -> list[tuple[tuple[int, int], float]]:
    pairs = list(itertools.combinations(range(lo, hi), 2))
    return [(p, 1.0 / len(pairs)) for p in pairs]


def _drtune_outcomes(n: int, s) -> list[tuple[dict, float]]:
    """(e, picks) with probabilities: e = N - r, r uniform in 1..round(fraction N); K steps of stride
    floor((e + 1) / K) in [0, e] from a uniform offset (drtune.draw_early_stop, draw_equally_spaced)."""
    m = min(round(n * s.early_stop_fraction), n)
    es = [(n - 1, 1.0)] if m <= 0 else [(n - r, 1.0 / m) for r in range(1, m + 1)]
    out = []
    for e, pe in es:
        total = e + 1
        count = min(s.drtune_steps, total)
        if count == total:
            out.append(({"e": e, "picks": list(range(total))}, pe))
            continue
        stride = max(1, total // count)
        if total - 1 - (count - 1) * stride < 0:
            stride = max(1, (total - 1) // max(1, count - 1))
        top = max(0, total - 1 - (count - 1) * stride)
        for start in range(top + 1):
            out.append(({"e": e, "picks": [start + i * stride for i in range(count)]}, pe / (top + 1)))
    return out


def outcomes(s, n: int) -> list[tuple[dict, float]] | None:
    """Every draw of method `s.name` with its probability, or None where there is no finite list (Dirichlet pairs,
    Gaussian re-noising)."""
    from leapalign_fast.methods.flowbp_bridge import split_active
    from leapalign_fast.methods.settings import resolve_window

    if s.name in ("full", "draft"):
        return [({}, 1.0)]
    if s.name == "refl":
        c = s.count(n)
        return [({"i": n - 1 - r}, 1.0 / c) for r in range(c)]
    if s.name == "drtune":
        if s.variant == "uniform":
            lo, hi = resolve_window(s.index_window, n, min_span=1)
            sets = list(itertools.combinations(range(lo, hi), min(s.drtune_steps, hi - lo)))
            return [({"picks": list(p)}, 1.0 / len(sets)) for p in sets]
        return _drtune_outcomes(n, s)
    if s.name == "flowbp_sparse":
        return [({"active": a}, p) for a, p in late_biased_sets(0, n, s.num_active_steps, s.late_bias)]
    if getattr(s, "index_sampler", None) != "uniform":
        return None
    pairs = _uniform_pairs(*s.window(n))
    if s.name in ("leapalign", "flowbp_lagrange"):
        return [({"pair": pair}, p) for pair, p in pairs]
    if s.name == "flowbp_bridge":
        out = []
        for (_, j), pj in pairs:
            n_pre, n_post = split_active(s.num_active_steps, j, n - j)
            for pre, pp in late_biased_sets(0, j, n_pre, s.late_bias):
                posts = late_biased_sets(j + 1, n, n_post - 1, s.late_bias) if n_post > 1 else [([], 1.0)]
                for post, pq in posts:
                    out.append(({"pre": pre, "post": [j] + post}, pj * pp * pq))
        return out
    return None


def expected_gradient(flow: LinearFlow, s) -> np.ndarray | None:
    """E over the method's randomness of its gradient on the linear flow (None: no closed form)."""
    if s.name == "draft_lv":
        return _draft_lv_expected(flow, s)
    outs = outcomes(s, flow.n)
    if outs is None:
        return None
    return sum(p * surrogate_gradient(flow, s, d) for d, p in outs)


def _draft_lv_expected(flow: LinearFlow, s) -> np.ndarray:
    """DRaFT-LV's mean over eps ~ N(0, I): each re-noising's term is quadratic in eps; with x_t = m + t eps and the
    cotangent G = kappa (x_t M - t (b + t c) - y), M = I - t W^T, its mean is the term at eps = 0 plus
    kappa t^2 L M^T per sample in dW (E[eps^T eps] = L I per sample). Valid while every hinge stays active."""
    xs, t, i = flow.states(), flow.t[flow.n - 1], flow.n - 1
    x0 = xs[-1]
    bsz, length, ch = x0.shape
    last = -flow.h[i] * flow.vjp(flow.hinge_grad(x0), xs[i], t)
    m = (1 - t) * x0
    pred = m - t * flow.v(m, t)
    at_zero = -t * flow.vjp(flow.hinge_grad(pred), m, t)
    kappa = (2.0 / (length * ch)) / bsz
    M = np.eye(ch) - t * flow.W.T
    extra = np.zeros_like(at_zero)
    extra[: ch * ch] = (-t * kappa * t * t * length * bsz * M.T).ravel()
    return (last + s.renoise * (at_zero + extra)) / (1 + s.renoise)

"""bench/gradient_fidelity.py checks itself on a flow with closed-form gradients (bench/fidelity_closed_form.py: a
velocity linear in x, a quadratic reward), through the methods' own loss builders: `full` equals the formula to
float64 round-off, every surrogate's draw equals its formula, the mean over draws its expected gradient, and a
perturbed coefficient (in the method or in the formula) is caught. Plus the statistics over draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.fidelity_closed_form import LinearVelocity, expected_gradient, late_biased_sets, outcomes
from bench.gradient_fidelity import (
    CLOSED_FORM_METHODS,
    ClosedFormSource,
    check_method,
    fidelity,
    passes,
    settings_of,
    split_gram,
)


@pytest.fixture(scope="module")
def src():
    return ClosedFormSource(num_steps=6, seed=0)


@pytest.mark.parametrize("num_steps", [1, 4, 9])
def test_full_equals_the_closed_form_to_round_off(num_steps):
    s = ClosedFormSource(num_steps=num_steps, seed=num_steps)
    got, _ = s.grad(settings_of("full", s.lam, num_steps), 0)
    want = s.flow.full()
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())


def test_the_formula_is_not_autograd_of_the_same_graph():
    """The formula's trajectory is numpy's own Euler chain: it equals the sampler's states, and the full gradient
    changes when W does (a formula that ignored the chain's Jacobians would not)."""
    s = ClosedFormSource(num_steps=5, seed=3)
    from leapalign_fast.sampler import sample_trajectory

    traj = sample_trajectory(s.model, s.noise, s.sigmas, keep_states=True)
    for x, y in zip(traj.states, s.flow.states()):
        np.testing.assert_allclose(x.numpy(), y, rtol=0, atol=1e-14)
    chain_free = s.flow.full()
    s.flow.W = s.flow.W * 1.01
    assert np.abs(s.flow.full() - chain_free).max() > 1e-6


@pytest.mark.parametrize("spec", CLOSED_FORM_METHODS)
def test_each_method_matches_its_formula(src, spec):
    row = check_method(src, spec, draws=24)
    assert row["per_draw_max_rel_error"] < 1e-10, row
    assert row["passes"], row
    if spec.split(":")[0] in ("leapalign", "refl", "draft_lv", "drtune", "flowbp_sparse", "flowbp_bridge"):
        assert row["mean_minus_expected_over_se"] is not None  # random, with a closed-form expectation
    if spec in ("full", "draft", "draft:draft_k=3"):
        assert row["mean_minus_expected_rel"] < 1e-12


@pytest.mark.parametrize(
    "method,formula",
    [
        ("leapalign:alpha=0.4", "leapalign"),  # alpha perturbed in the method
        ("leapalign", "leapalign:alpha=0.4"),  # ... or in the formula
        ("leapalign:tau=0.0001,alpha=0.3", "leapalign:tau=0.0001,alpha=0.35"),
        ("flowbp_bridge:alpha=0.2", "flowbp_bridge"),
        ("flowbp_sparse:grad_rescale=0.5", "flowbp_sparse"),
        ("flowbp_lagrange:support_scale=0.5", "flowbp_lagrange"),
        ("flowbp_lagrange:alpha=0.2", "flowbp_lagrange"),
        ("draft:draft_k=2", "draft"),
        ("draft_lv:renoise=3", "draft_lv"),
    ],
)
def test_a_perturbed_coefficient_fails_the_check(src, method, formula):
    row = check_method(src, method, draws=12, formula_spec=formula)
    assert not row["passes"], row
    assert row["per_draw_max_rel_error"] > 1e-4


@pytest.mark.parametrize(
    "method,wrong",
    [
        ("leapalign", "leapalign:index_window=[2,6]"),  # pairs from another window
        ("flowbp_sparse", "flowbp_sparse:late_bias=0.0"),  # active steps with another bias
        ("refl", "refl:late_steps=6"),  # the grad step from any step
    ],
)
def test_a_perturbed_expectation_fails_the_check(src, method, wrong):
    """The mean over draws is checked against the expectation, a sum over the draw distribution's outcomes: an
    expectation over another distribution is caught (the per-draw comparison checks the coefficients)."""
    s = settings_of(method, src.lam, src.num_steps)
    right = expected_gradient(src.flow, s)
    other = expected_gradient(src.flow, settings_of(wrong, src.lam, src.num_steps))
    draws = np.stack([src.grad(s, 1000 + i)[0] for i in range(64)])
    se = math.sqrt(draws.var(0, ddof=1).sum() / len(draws))
    assert np.linalg.norm(draws.mean(0) - right) / se < 4
    assert np.linalg.norm(draws.mean(0) - other) / se > 4
    row = {"per_draw_max_rel_error": 0.0, "mean_minus_expected_rel": 0.1, "draws": 64}
    assert passes({**row, "mean_minus_expected_over_se": 1.0}) and not passes({**row, "mean_minus_expected_over_se": 9})
    assert passes({**row, "mean_minus_expected_over_se": 9, "draws": 4})  # too few draws to judge the mean


def test_outcome_probabilities_sum_to_one():
    assert sum(p for _, p in late_biased_sets(0, 7, 3, 2.0)) == pytest.approx(1.0, abs=1e-12)
    assert late_biased_sets(2, 4, 5, 2.0) == [([2, 3], 1.0)]
    for spec in CLOSED_FORM_METHODS:
        outs = outcomes(settings_of(spec, 1.0, 8), 8)
        if outs is not None:
            assert sum(p for _, p in outs) == pytest.approx(1.0, abs=1e-12), spec


def test_late_biased_set_probabilities_match_the_sampler():
    from leapalign_fast.methods.indices import draw_late_biased

    probs = {tuple(s): p for s, p in late_biased_sets(0, 5, 2, 2.0)}
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts: dict[tuple, int] = {}
    for _ in range(n):
        key = tuple(draw_late_biased(0, 5, 2, 2.0, g))
        counts[key] = counts.get(key, 0) + 1
    for key, p in probs.items():
        assert abs(counts.get(key, 0) / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3, key


def test_fidelity_statistics():
    rng = np.random.default_rng(0)
    g = rng.normal(size=50)
    draws = 0.5 * g + rng.normal(scale=0.3, size=(20, 50))
    out = fidelity(draws, g, np.random.default_rng(1), boots=500)
    mean = draws.mean(0)
    assert out["cos_mean"] == pytest.approx(mean @ g / np.linalg.norm(mean) / np.linalg.norm(g), rel=1e-12)
    assert out["norm_ratio"] == pytest.approx(np.linalg.norm(mean) / np.linalg.norm(g), rel=1e-12)
    assert out["rel_error"] == pytest.approx(np.linalg.norm(mean - g) / np.linalg.norm(g), rel=1e-10)
    trace = draws.var(0, ddof=1).sum()
    assert out["snr"] == pytest.approx(mean @ mean / trace, rel=1e-10)
    per = draws @ g / np.linalg.norm(draws, axis=1) / np.linalg.norm(g)
    assert out["cos_draw"]["mean"] == pytest.approx(per.mean(), rel=1e-12)
    # the intervals are bias-corrected: they hold the true values (E = 0.5 g, covariance 0.09 I)
    lo, hi = out["ci"]["cos_mean"]
    assert lo <= 1.0 <= hi and hi - lo > 0
    lo, hi = out["ci"]["norm_ratio"]
    assert lo <= 0.5 <= hi
    lo, hi = out["ci"]["snr"]
    assert lo <= 0.25 * (g @ g) / (50 * 0.09) <= hi
    idx = np.arange(10, 30)  # a parameter group: the same statistics over its entries
    sub = fidelity(draws, g, np.random.default_rng(1), boots=10, idx=idx)
    m = draws[:, idx].mean(0)
    assert sub["cos_mean"] == pytest.approx(m @ g[idx] / np.linalg.norm(m) / np.linalg.norm(g[idx]), rel=1e-12)
    tensors = split_gram({"results": {"s": {"rows": [{"method": "m", "groups": {"all": out}}]}}})
    K, u, gg = (tensors[f"s/m/all/{k}"].numpy() for k in ("K", "u", "gg"))  # the statistics again, from the file's
    c = np.full(20, 1 / 20)
    assert c @ u / math.sqrt(c @ K @ c * gg) == pytest.approx(out["cos_mean"], rel=1e-12) and "gram" not in out
    same = fidelity(np.stack([g, g]), g, np.random.default_rng(1))
    assert same["snr"] is None and same["draws_equal"] and same["cos_mean"] == pytest.approx(1.0)


def test_linear_velocity_is_what_the_formula_says():
    m = LinearVelocity(3, generator=torch.Generator().manual_seed(1))
    x, t = torch.randn(2, 4, 3, dtype=torch.float64), torch.tensor([0.3, 0.7], dtype=torch.float64)
    want = x @ m.W.T + m.b + t[:, None, None] * m.c
    torch.testing.assert_close(m(x, t), want, rtol=0, atol=0)


@pytest.mark.slow
def test_the_benchmark_runs_on_the_toy_model_through_the_trainer(tmp_path):
    """The real-model path end to end at toy size: the trainer's step, the two base-model sets, tables, plots and the
    Gram file; `full` against itself is exact, LeapAlign's cosine lies in (0, 1)."""
    import json

    from bench.gradient_fidelity import main

    argv = ["--steps", "4", "--draws", "2", "--batch", "1", "--methods", "full", "leapalign", "--no-grid"]
    argv += ["--no-trained", "--closed-form-draws", "2", "--out", str(tmp_path), "--tag", "t"]
    assert main(argv) == 0
    out = json.loads((tmp_path / "gradient_fidelity_toy_cpu_t.json").read_text())
    assert set(out["results"]) == {"select/N4", "report/N4"}
    for res in out["results"].values():
        rows = {r["method"]: r for r in res["rows"]}
        assert rows["full"]["groups"]["all"]["cos_mean"] == pytest.approx(1.0, abs=1e-6)
        assert 0 < rows["leapalign"]["groups"]["all"]["cos_mean"] < 1
        assert {"double_blocks", "single_blocks", "other"} <= set(rows["leapalign"]["groups"])
        assert rows["leapalign"]["activation_mib"] < rows["full"]["activation_mib"]
    assert (tmp_path / out["gram_file"]).is_file() and (
        tmp_path / "gradient_fidelity_toy_cpu_t_report_N4.png"
    ).is_file()


def test_the_grid_fits_n_and_the_pick_is_the_select_sets_best():
    from bench.gradient_fidelity import grid_for, pick_grid

    assert "draft:draft_k=5" not in grid_for(4) and "draft:draft_k=12" in grid_for(25)
    assert not any("index_window" in g for g in grid_for(3))
    for n in (3, 10, 25):
        for spec in grid_for(n):
            settings_of(spec, 1.0, n)  # every variant is valid at its N
    row = lambda m, c: {"method": m, "name": m.split(":")[0], "groups": {"all": {"cos_mean": c}}}
    select = {
        "rows": [row("leapalign", 0.7), row("leapalign:alpha=1.0", 0.8), row("leapalign:reward_first=false", 0.9)]
    }
    select["rows"] += [row("draft", 0.2), row("draft:draft_k=5", 0.3)]
    picks = pick_grid(select)
    assert picks["leapalign"]["chosen"] == "leapalign:alpha=1.0" and picks["draft"]["chosen"] == "draft:draft_k=5"

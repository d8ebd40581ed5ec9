"""Gradient fidelity: how close each method's gradient is to the full-trajectory gradient, how noisy it is, and
what it costs, measured on one fixed model state and one fixed batch of prompts and noises.

    python bench/gradient_fidelity.py          # the default run: toy model, N = 25, every method, the grid chosen on
                                               # one set and reported on two others (about 12 min on 2 busy cores)
    python bench/gradient_fidelity.py --model mid --batch 2 --draws 6 --no-grid --no-trained --only-set report
    python bench/gradient_fidelity.py --steps 10 50 --no-grid --no-trained --only-set report --draws 8 --tag n10-50
    python bench/gradient_fidelity.py --set lora.enabled=true --no-grid --no-trained --only-set report --draws 8 \
        --tag lora
    python bench/gradient_fidelity.py --closed-form-only       # the harness's check on the closed-form flow only
    python bench/gradient_fidelity.py --replot bench/results/gradient_fidelity_toy_cpu.json   # tables + plots again

For every method variant (`name` or `name:key=value,...`, as bench/memory.py takes them) the harness runs the
trainer's own step (`Trainer.micro_step`, the method's loss builder and `accelerator.backward`) M times on the same
model state, prompts and noise, each time with another generator for the method's own randomness (its step indices,
Dirichlet draws, re-noisings), and keeps every draw's gradient. The reference g is method `full` (backprop through
all N steps) of the same objective: the hinge on the reward of the real x_0. Per parameter group (the double-stream
blocks, the single-stream blocks, the rest; with LoRA only the adapters train) and for all parameters together:

- `cos_mean`: cosine between the method's mean gradient (over the M draws) and g: the direction of its expectation;
- `norm_ratio`: |mean| / |g| (LeapAlign's similarity weight scales its loss, so its ratio is not 1 at best);
- `rel_error`: |mean - g| / |g| (direction and scale together);
- `cos_draw`: the cosine of single draws with g (what one training step sees; mean, t interval, quantiles);
- `snr`: |mean|^2 / trace(covariance over draws): the signal-to-noise ratio of one draw (None: no randomness);
- intervals: 95% basic bootstrap over the draws (2000 resamples; 2 x estimate - the resamples' quantiles, which
  corrects the estimates' bias: the noise left in a mean of M draws pulls cos_mean down and norm_ratio up) for
  cos_mean, norm_ratio and snr; each group's Gram matrix of the draws (with g) is in the JSON to recompute any;
- beside them, from the same trainer: `activation_mib` (the saved-tensor count of bench/memory.py) and the step time
  (median of the M measured micro-steps, with min and max, wall and process CPU seconds; on two shared CPU cores
  the wall time is pessimistic and noisy, the CPU time less so).

Held-out discipline: the grid (LeapAlign alpha, tau and index window, DRaFT K) is chosen on the `select` set (model
state, prompt indices, noise seed, method seeds) and reported on the `report` sets (other prompts, noise and method
seeds; the base model and, unless --no-trained, a checkpoint trained by the shipped default for --trained-steps
steps). All of them are written down in the JSON.

The closed-form model (bench/fidelity_closed_form.py: a velocity linear in x, a quadratic reward) runs first through
the same loss builders; its full gradient and each method's expected gradient are formulas, and the JSON records
how far the measurement is from them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import numpy as np  # noqa: E402

from bench.stats import mean_ci  # noqa: E402

DEFAULT_METHODS = [
    "full",
    "leapalign",
    "leapalign:reward_first=false",
    "refl",
    "draft",
    "draft_lv",
    "drtune",
    "flowbp_sparse",
    "flowbp_bridge",
    "flowbp_lagrange",
]


def grid_for(n: int) -> list[str]:
    """The grid, chosen on the select set; each family's pick is then reported on the held-out sets. Windows and K
    that do not fit N are left out."""
    half = n // 2
    windows = [f"leapalign:index_window=[0,{half}]", f"leapalign:index_window=[{half},{n}]"]  # noisy, clean half
    ks = sorted({k for k in (2, 5, half) if 1 < k <= n})
    return [
        "leapalign:alpha=0.0",
        "leapalign:alpha=0.6",
        "leapalign:alpha=1.0",
        "leapalign:tau=0.01",
        "leapalign:tau=0.5",
        *(windows if half >= 2 and n - half >= 2 else []),
        *(f"draft:draft_k={k}" for k in ks),
    ]


DETERMINISTIC = ("full", "draft")  # no randomness of their own: two draws show it (identical gradients)
BOOTSTRAP = 2000


# -- statistics over draws ---------------------------------------------------------------------------------------


def gram(draws: np.ndarray, g: np.ndarray, idx: np.ndarray | None = None, chunk: int = 1 << 20):
    """(K, u, |g|^2) of the draws (M, P) restricted to `idx`: K = D D^T, u = D g, in float64, chunk by chunk (a
    full fine-tune's draws stay float32 in memory)."""
    idx = np.arange(draws.shape[1]) if idx is None else idx
    m = draws.shape[0]
    K, u, gg = np.zeros((m, m)), np.zeros(m), 0.0
    for lo in range(0, len(idx), chunk):
        sel = idx[lo : lo + chunk]
        d, gc = draws[:, sel].astype(np.float64), g[sel].astype(np.float64)
        K += d @ d.T
        u += d @ gc
        gg += float(gc @ gc)
    return K, u, gg


def fidelity(draws: np.ndarray, g: np.ndarray, rng: np.random.Generator, boots: int = BOOTSTRAP, idx=None) -> dict:
    """Fidelity of M draws (M, P) of an estimator against the reference g (P,), over parameters `idx` (default
    all), from their Gram matrix (so the bootstrap costs M x M per resample, whatever P is)."""
    K, u, gg = gram(draws, g, idx)
    m = draws.shape[0]
    if gg == 0.0:
        return {"reference_norm": 0.0, "draws": m}
    equal = bool(np.allclose(K, K[0, 0], rtol=1e-12, atol=0)) and m > 1  # every draw gave the same gradient

    def stats(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # c: (R, M) weights summing to 1
        sq = np.einsum("ri,ij,rj->r", c, K, c)  # |mean|^2
        cos = (c @ u) / np.sqrt(np.maximum(sq, 1e-300) * gg)
        trace = (np.einsum("ri,i->r", c, np.diag(K)) - sq) * m / max(m - 1, 1)  # sample covariance's trace
        noisy = trace > 1e-12 * np.maximum(sq, 1e-300)
        return cos, np.sqrt(sq / gg), np.divide(sq, trace, out=np.full_like(sq, np.inf), where=noisy)

    c0 = np.full((1, m), 1.0 / m)
    cos, ratio, snr = (float(x[0]) for x in stats(c0))
    sq = float(c0[0] @ K @ c0[0])
    per_draw = (u / np.sqrt(np.maximum(np.diag(K), 1e-300) * gg)).tolist()
    out = {
        "draws": m,
        "reference_norm": math.sqrt(gg),
        "cos_mean": cos,
        "norm_ratio": ratio,
        "rel_error": math.sqrt(max(sq - 2 * float(c0[0] @ u) + gg, 0.0) / gg),
        "snr": None if math.isinf(snr) else snr,
        "draws_equal": equal,
        "cos_draw": {
            **mean_ci(per_draw),
            **dict(zip(("min", "q10", "median", "q90", "max"), np.quantile(per_draw, [0, 0.1, 0.5, 0.9, 1]).tolist())),
        },
    }
    if m > 1 and not equal:
        counts = rng.multinomial(m, np.full(m, 1.0 / m), size=boots) / m
        boot = dict(zip(("cos_mean", "norm_ratio", "snr"), stats(counts)))
        point = {"cos_mean": cos, "norm_ratio": ratio, "snr": snr}
        bounds = {"cos_mean": (-1.0, 1.0), "norm_ratio": (0.0, math.inf), "snr": (0.0, math.inf)}
        out["ci"] = {"bootstrap": boots, "kind": "basic (bias-corrected) 95%"}
        for key, x in boot.items():
            x = x[np.isfinite(x)]
            if len(x) and math.isfinite(point[key]):  # basic bootstrap: 2 theta - the resamples' quantiles
                lo, hi = np.quantile(x, [0.025, 0.975])
                out["ci"][key] = np.clip([2 * point[key] - hi, 2 * point[key] - lo], *bounds[key]).tolist()
    out["gram"] = {"K": K, "u": u, "gg": gg}  # every statistic above can be recomputed from these (split_gram)
    return out


# -- where gradients come from -----------------------------------------------------------------------------------


@dataclass
class Source:
    """One fixed model state + prompts + noise: `grad(settings, method_seed)` runs the method's loss builder once
    and returns the flattened parameter gradient (float64) and the seconds it took."""

    name: str
    groups: dict[str, np.ndarray]  # group -> flat indices ("all" included)
    num_steps: int
    lam: float
    info: dict = field(default_factory=dict)

    def grad(self, settings, method_seed: int) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def memory(self, spec: str) -> dict:
        return {}


class ClosedFormSource(Source):
    """The linear flow of bench/fidelity_closed_form.py, float64, through the methods' loss builders."""

    def __init__(self, num_steps: int = 6, batch: int = 3, length: int = 4, channels: int = 3, seed: int = 0):
        import torch

        from bench.fidelity_closed_form import LinearFlow, LinearVelocity, QuadraticReward
        from leapalign_fast.flow import flux_schedule

        g = torch.Generator().manual_seed(seed)
        self.model = LinearVelocity(channels, generator=g)
        self.reward = QuadraticReward(0.5 * torch.randn(length, channels, generator=g, dtype=torch.float64))
        self.noise = torch.randn(batch, length, channels, generator=g, dtype=torch.float64)
        self.sigmas = flux_schedule(num_steps, length).double()
        lam = 1.0  # r <= 0 < lam: every hinge is active
        sizes = [p.numel() for p in self.model.parameters()]
        groups = {"all": np.arange(sum(sizes)), "matrix": np.arange(sizes[0]), "bias": np.arange(sizes[0], sum(sizes))}
        super().__init__(
            "closed_form", groups, num_steps, lam, {"batch": batch, "length": length, "channels": channels}
        )
        self.flow = LinearFlow.of(self.model, self.reward, self.noise, self.sigmas, lam)

    def inputs(self, generator):
        from bench.fidelity_closed_form import closed_form_inputs

        return closed_form_inputs(self.model, self.reward, self.noise, self.sigmas, generator)

    def grad(self, settings, method_seed: int) -> tuple[np.ndarray, float]:
        import torch

        from leapalign_fast.methods import build_method

        method = build_method(settings, self.num_steps)
        t0 = time.perf_counter()
        out = method(self.inputs(torch.Generator().manual_seed(method_seed)))
        grads = torch.autograd.grad(out.loss, list(self.model.parameters()))
        return torch.cat([x.reshape(-1) for x in grads]).numpy().copy(), time.perf_counter() - t0


def param_group(name: str) -> str:
    """A FLUX transformer parameter's group: double-stream blocks, single-stream blocks, or the rest (embedders,
    norms, the output projection)."""
    if name.startswith("single_transformer_blocks."):
        return "single_blocks"
    if name.startswith("transformer_blocks."):
        return "double_blocks"
    return "other"


class TrainerSource(Source):
    """A Trainer (toy or mid model): each gradient is one `Trainer.micro_step` on prompts `idx` with the noise of
    `noise_seed` and the method's draws from `method_seed`; the gradients are read off the trainable parameters."""

    def __init__(self, name: str, run, idx: list[int], noise_seed: int, num_steps: int, info: dict):
        from leapalign_fast.train import unwrap

        self.run, self.idx, self.noise_seed = run, idx, noise_seed
        named = [(n, p) for n, p in unwrap(run.transformer).named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        groups: dict[str, list[int]] = {}
        start = 0
        for n, p in named:
            groups.setdefault(param_group(n), []).extend(range(start, start + p.numel()))
            start += p.numel()
        groups = {"all": np.arange(start), **{k: np.asarray(v) for k, v in groups.items()}}
        run.sigmas = run.backbone.schedule(run.components, num_steps, run.geometry, device=run.accelerator.device)
        super().__init__(
            name, groups, num_steps, run.cfg.method.lam, {**info, "prompts": idx, "noise_seed": noise_seed}
        )

    def grad(self, settings, method_seed: int) -> tuple[np.ndarray, float]:
        import torch

        from leapalign_fast.methods import build_method

        method = build_method(settings, self.num_steps)
        self.run.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        self.run.micro_step(
            self.idx,
            torch.Generator().manual_seed(self.noise_seed),
            method,
            method_generator=torch.Generator().manual_seed(method_seed),
        )
        seconds = time.perf_counter() - t0
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in self.params]
        )
        self.run.optimizer.zero_grad(set_to_none=True)
        return flat.numpy().copy(), seconds

    def memory(self, spec: str) -> dict:
        """bench/memory.py's count of one step of this variant on this trainer (activation bytes, peak RSS)."""
        from bench.memory import measure
        from leapalign_fast.train import unwrap

        run = self.run
        parts = [
            (unwrap(run.transformer), "transformer"),
            (run.components.vae.decoder, "decode_reward"),
            (run.reward, "decode_reward"),
        ]
        row, _ = measure(run, spec, self.num_steps, run.cfg.resolution, parts)
        return {k: row.get(k) for k in ("activation_mib", "activation_by_part_mib", "peak_rss_mib", "peak_mib")}


# -- the measurement ---------------------------------------------------------------------------------------------


def settings_of(spec: str, lam: float, n: int):
    from bench.memory import method_variant

    return method_variant(spec, lam, n)


def measure_variant(source: Source, spec: str, draws: int, seeds: list[int], g: np.ndarray, rng) -> dict:
    """M draws of one variant on one source: their fidelity per group, step time and memory."""
    s = settings_of(spec, source.lam, source.num_steps)
    m = 2 if s.name in DETERMINISTIC else draws
    grads, secs, cpu = [], [], []
    for seed in seeds[:m]:
        c0 = time.process_time()
        gr, sec = source.grad(s, seed)
        cpu.append(time.process_time() - c0)
        grads.append(gr)
        secs.append(sec)
    stack = np.stack(grads)
    row = {
        "method": spec,
        "name": s.name,
        "num_steps": source.num_steps,
        "source": source.name,
        "method_seeds": seeds[:m],
        "deterministic": s.name in DETERMINISTIC,
        "step_seconds": statistics.median(secs),
        "step_seconds_min": min(secs),
        "step_seconds_max": max(secs),
        "step_cpu_seconds": statistics.median(cpu),  # process CPU time (both threads) of the whole draw
        "groups": {k: fidelity(stack, g, rng, idx=idx) for k, idx in source.groups.items()},
        **source.memory(spec),
    }
    return row


def run_source(source: Source, specs: list[str], draws: int, seed_base: int, log=print) -> dict:
    """The reference g (method `full`) and every variant on one source."""
    rng = np.random.default_rng(seed_base)
    full = settings_of("full", source.lam, source.num_steps)
    g, _ = source.grad(full, seed_base)
    g = g.astype(np.float64)
    seeds = [seed_base + 1 + i for i in range(draws)]
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        row = measure_variant(source, spec, draws, seeds, g, rng)
        a = row["groups"]["all"]
        ci = a.get("ci", {}).get("cos_mean")
        log(
            f"  {source.name:>14} N={source.num_steps:<3} {spec:<34} cos(mean,g) {a['cos_mean']:+.3f}"
            f"{f' [{ci[0]:+.3f}, {ci[1]:+.3f}]' if ci else '':<18} |mean|/|g| {a['norm_ratio']:.3f}  "
            f"cos draw {a['cos_draw']['mean']:+.3f}  snr {a['snr'] if a['snr'] is None else round(a['snr'], 3)}  "
            f"act {row.get('activation_mib') or float('nan'):.1f} MiB  step {row['step_seconds']:.3f} s  "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        rows.append(row)
    return {"source": source.name, "num_steps": source.num_steps, "info": source.info, "rows": rows}


# -- the closed-form check ---------------------------------------------------------------------------------------

CLOSED_FORM_METHODS = [
    "full",
    "leapalign",
    "leapalign:reward_first=false",
    "leapalign:alpha=1.0",
    "refl",
    "draft",
    "draft:draft_k=3",
    "draft_lv",
    "drtune",
    'drtune:variant="uniform"',
    "flowbp_sparse",
    "flowbp_bridge",
    "flowbp_lagrange",
    'flowbp_lagrange:index_sampler="uniform"',
    "leapalign:tau=0.0001",  # the similarity weight then differs per sample
]


def check_method(src: ClosedFormSource, spec: str, draws: int, formula_spec: str | None = None, seed: int = 0) -> dict:
    """One method on the linear flow: each draw's gradient through its loss builder against the formula for that
    draw, and the mean over draws against the formula's expected gradient. `formula_spec` gives the formula other
    settings than the method's (a perturbed coefficient: the check must then fail)."""
    import torch

    from bench.fidelity_closed_form import expected_gradient, replay_draw, surrogate_gradient

    n = src.num_steps
    s = settings_of(spec, src.lam, n)
    sf = settings_of(formula_spec or spec, src.lam, n)
    g_formula = src.flow.full()
    grads, per_draw_err = [], []
    for i in range(draws):
        gen_seed = 1000 + seed * draws + i
        gr, _ = src.grad(s, gen_seed)
        draw = replay_draw(sf, n, torch.Generator().manual_seed(gen_seed), tuple(src.noise.shape))
        want = surrogate_gradient(src.flow, sf, draw)
        per_draw_err.append(float(np.abs(gr - want).max() / np.abs(want).max()))
        grads.append(gr)
    stack = np.stack(grads)
    mean = stack.mean(0)
    se = math.sqrt(stack.var(0, ddof=1).sum() / draws) if draws > 1 else 0.0  # the mean's standard error, in norm
    expected = expected_gradient(src.flow, sf)
    row = {"method": spec, "draws": draws, "per_draw_max_rel_error": max(per_draw_err), "cos_expected_vs_full": None}
    if formula_spec:
        row["formula"] = formula_spec
    if expected is not None:
        gap = float(np.linalg.norm(mean - expected))
        row.update(
            cos_expected_vs_full=float(expected @ g_formula / np.linalg.norm(expected) / np.linalg.norm(g_formula)),
            expected_norm_ratio=float(np.linalg.norm(expected) / np.linalg.norm(g_formula)),
            mean_minus_expected_rel=gap / float(np.linalg.norm(expected)),
            mean_minus_expected_over_se=gap / se if se > 1e-12 * np.linalg.norm(expected) else None,
        )
    row["measured"] = fidelity(stack, g_formula, np.random.default_rng(seed))
    row["measured"].pop("gram")  # the formulas reproduce these draws exactly: no need to keep them
    row["passes"] = passes(row)
    return row


PER_DRAW_TOL = 1e-10  # float64 round-off, relative to the gradient's largest entry
EXPECTED_Z = 4.0  # |mean - E| within 4 standard errors (norms); deterministic methods: to round-off
EXPECTED_MIN_DRAWS = 16  # fewer draws estimate the standard error too poorly (heavy tails: LeapAlign at tiny tau)


def passes(row: dict) -> bool:
    """The closed-form verdict: every draw equals its formula, and (with at least EXPECTED_MIN_DRAWS draws) the mean
    over draws its expectation."""
    ok = row["per_draw_max_rel_error"] < PER_DRAW_TOL
    if row.get("mean_minus_expected_rel") is not None and row.get("draws", EXPECTED_MIN_DRAWS) >= EXPECTED_MIN_DRAWS:
        z = row["mean_minus_expected_over_se"]
        ok = ok and (row["mean_minus_expected_rel"] < PER_DRAW_TOL if z is None else z < EXPECTED_Z)
    return ok


def closed_form_check(draws: int = 64, num_steps: int = 6, seed: int = 0) -> dict:
    """Every method of CLOSED_FORM_METHODS on the linear flow (check_method), and `full` against the formula."""
    src = ClosedFormSource(num_steps=num_steps, seed=seed)
    rows = [check_method(src, spec, draws, seed=seed) for spec in CLOSED_FORM_METHODS]
    gr_full, _ = src.grad(settings_of("full", src.lam, num_steps), 0)
    g_formula = src.flow.full()
    return {
        "num_steps": num_steps,
        "draws": draws,
        "shape": [src.info["batch"], src.info["length"], src.info["channels"]],
        "full_max_rel_error": float(np.abs(gr_full - g_formula).max() / np.abs(g_formula).max()),
        "all_pass": all(r["passes"] for r in rows),
        "rows": rows,
    }


# -- real models -------------------------------------------------------------------------------------------------


def build_trainer(model: str, tmp: Path, batch: int, overrides: list[str]):
    """The toy model with the shipped default's setup (configs/tiny.toml) or bench/memory.py's mid model (random
    weights, the colour reward), as a Trainer with its own output directory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from bench.memory import MODELS
    from leapalign_fast import train
    from leapalign_fast.config import TinyFluxConfig, load_config

    if model == "toy":
        cfg = load_config(ROOT / "configs" / "tiny.toml", overrides)
    else:
        cfg = load_config(None, [f"resolution={MODELS['mid'][1]}", *overrides])
        cfg.model.tiny = TinyFluxConfig(**MODELS["mid"][0])
        cfg.eval_prompts = ["a red square", "a green circle", "a blue triangle", "a yellow star"]
    cfg.output_dir, cfg.resume, cfg.report_to, cfg.batch_size = str(tmp), False, [], batch
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return train.Trainer(cfg, Accelerator(mixed_precision=cfg.mixed_precision, cpu=True))


def pick_grid(select: dict) -> dict:
    """Per family (leapalign, draft), the variant with the highest cos(mean, g) over all parameters on the select
    set, next to the shipped default's."""
    picks = {}
    for family in ("leapalign", "draft"):
        rows = [r for r in select["rows"] if r["name"] == family and "reward_first" not in r["method"]]
        best = max(rows, key=lambda r: r["groups"]["all"]["cos_mean"])
        picks[family] = {"chosen": best["method"], "cos_mean_select": best["groups"]["all"]["cos_mean"]}
    return picks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["toy", "mid"], default="toy")
    p.add_argument("--steps", type=int, nargs="+", default=[25], help="sampling steps N")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument("--no-grid", action="store_true", help="skip the LeapAlign alpha/tau/window and DRaFT K grid")
    p.add_argument("--draws", type=int, default=16, help="M draws of each method's randomness per set")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--trained-steps", type=int, default=40, help="steps of the shipped default for the trained state")
    p.add_argument("--no-trained", action="store_true", help="report on the base model only")
    p.add_argument("--only-set", choices=["select", "report", "report_trained"], default=None, help="run one set")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (e.g. lora.enabled=true)"
    )
    p.add_argument("--closed-form-only", action="store_true")
    p.add_argument("--closed-form-draws", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--tag", default="")
    p.add_argument("--replot", type=Path, default=None, help="rewrite the tables and plots of a result JSON")
    args = p.parse_args(argv)
    if args.replot:
        print("wrote", *replot(args.replot))
        return 0

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: a busy machine must not spin-wait
    import torch  # noqa: F401  (imported once the wait policy is set)

    from bench.common import write_result
    from leapalign_fast.config import config_dict
    from leapalign_fast.threads import describe_threads

    t_start = time.perf_counter()
    print(f"bench/gradient_fidelity.py: {describe_threads()}", flush=True)
    cf = closed_form_check(args.closed_form_draws)
    print(
        f"closed form: full max rel error {cf['full_max_rel_error']:.2e}; per-draw max rel error "
        + ", ".join(f"{r['method']} {r['per_draw_max_rel_error']:.1e}" for r in cf["rows"]),
        flush=True,
    )
    name = f"gradient_fidelity_{'closed_form' if args.closed_form_only else args.model}_cpu"
    name += f"_{args.tag}" if args.tag else ""
    payload: dict = {"closed_form": cf}
    if not args.closed_form_only:
        specs = args.methods or DEFAULT_METHODS
        families = {x.split(":")[0] for x in specs}
        grid_of = lambda n: [] if args.no_grid else [s for s in grid_for(n) if s.split(":")[0] in families]
        b = args.batch
        sets = {  # prompt indices, noise seed, method-seed base: chosen on `select`, reported on the others
            "select": {"state": "base", "prompts": list(range(b)), "noise_seed": 1000, "method_seed_base": 10_000},
            "report": {
                "state": "base",
                "prompts": list(range(b, 2 * b)),
                "noise_seed": 2000,
                "method_seed_base": 20_000,
            },
        }
        if not args.no_trained:
            sets["report_trained"] = {**sets["report"], "state": f"trained {args.trained_steps} steps"}
        if args.only_set:
            sets = {args.only_set: sets[args.only_set]}
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            run = build_trainer(args.model, Path(tmp), b, args.set)
            cfg_record = config_dict(run.cfg)
            for set_name, st in sets.items():  # the base-model sets first, then train, then the trained set
                if st["state"] != "base":
                    run.sigmas = run.backbone.schedule(
                        run.components, run.cfg.num_steps, run.geometry, device=run.accelerator.device
                    )
                    t0 = time.perf_counter()
                    rewards = [run.train_step()["reward"] for _ in range(args.trained_steps)]
                    st["train_reward_first_last"] = [rewards[0], rewards[-1]]
                    print(f"trained {args.trained_steps} steps ({time.perf_counter() - t0:.0f} s)", flush=True)
                for n in args.steps:
                    info = {"set": set_name, **st}
                    src = TrainerSource(f"{args.model}/{set_name}", run, st["prompts"], st["noise_seed"], n, info)
                    grid = grid_of(n)
                    these = specs + (grid if set_name == "select" else [])
                    if set_name != "select" and grid and f"select/N{n}" in results:
                        picks = pick_grid(results[f"select/N{n}"])
                        these = specs + [v["chosen"] for v in picks.values() if v["chosen"] not in specs]
                    results[f"{set_name}/N{n}"] = run_source(src, these, args.draws, st["method_seed_base"])
                    if set_name == "select" and grid:
                        results[f"select/N{n}"]["picks"] = pick_grid(results[f"select/N{n}"])
        payload.update(
            model=args.model,
            sets=sets,
            draws=args.draws,
            results=results,
            config=cfg_record,
            note="two shared CPU cores: step times are pessimistic and noisy; memory is bench/memory.py's count",
        )
    payload.update(threads=describe_threads(), wall_seconds=time.perf_counter() - t_start)
    args.out.mkdir(parents=True, exist_ok=True)
    gram = split_gram(payload)
    if gram:
        from leapalign_fast.io import save_tensors_atomic

        payload["gram_file"] = f"{name}_gram.safetensors"
        save_tensors_atomic(gram, args.out / payload["gram_file"])
    path = write_result(args.out / f"{name}.json", payload)
    extra = (
        write_tables(payload, args.out / name)
        if "results" in payload
        else [write_closed_form_md(payload, args.out / name)]
    )
    print("wrote", path, *extra, f"in {payload['wall_seconds']:.0f} s")
    if not cf["all_pass"]:
        failed = [r["method"] for r in cf["rows"] if not r["passes"]]
        print(f"bench/gradient_fidelity.py: the closed-form check FAILED for {failed}: do not trust the tables")
        return 1
    return 0


def _fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def write_closed_form_md(payload: dict, stem: Path) -> Path:
    cf = payload["closed_form"]
    md = [
        f"Closed-form check: linear velocity, quadratic reward, N = {cf['num_steps']}, latents {cf['shape']}, "
        f"{cf['draws']} draws per method. `full` against the formula: max relative error "
        f"{cf['full_max_rel_error']:.1e}.",
        "",
        "| method | passes | per-draw max rel. error vs formula | cos(E[g_method], g) | abs(E[g_method]) / abs(g) | "
        "abs(mean - E) / s.e. (norms) | measured cos(mean, g) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in cf["rows"]:
        md.append(
            f"| {r['method']} | {r['passes']} | {r['per_draw_max_rel_error']:.1e} | "
            f"{_fmt(r['cos_expected_vs_full'])} | "
            f"{_fmt(r.get('expected_norm_ratio'))} | {_fmt(r.get('mean_minus_expected_over_se'), 2)} | "
            f"{_fmt(r['measured'].get('cos_mean'))} |"
        )
    path = Path(f"{stem}_closed_form.md") if "results" in payload else Path(f"{stem}.md")
    path.write_text("\n".join(md) + "\n")
    return path


def _snr(row: dict, snr) -> str:
    if snr is not None:
        return f"{snr:.3f}"
    return "inf (no randomness)" if row["deterministic"] else "n/a (the draws were equal)"


def _ci(r: dict, key: str) -> str:
    ci = (r.get("ci") or {}).get(key)
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def write_tables(payload: dict, stem: Path) -> list[Path]:
    md = [write_closed_form_md(payload, stem).read_text(), ""]
    for key, res in payload["results"].items():
        info = res["info"]
        md += [
            f"### {key}: {info['state']} model, prompts {info['prompts']}, noise seed {info['noise_seed']}, "
            f"method seeds from {info['method_seed_base'] + 1}",
            "",
            "| method | cos(mean, g) [95% CI] | abs(mean)/abs(g) [CI] | cos one draw: mean [q10, q90] | SNR [CI] | "
            + " | ".join(f"cos {k}" for k in res["rows"][0]["groups"] if k != "all")
            + " | activation MiB | step s (median wall) | step CPU s (median) |",
            "|---" * (8 + len(res["rows"][0]["groups"]) - 1) + "|",
        ]
        for r in res["rows"]:
            a = r["groups"]["all"]
            cd, a_snr = a["cos_draw"], a["snr"]
            md.append(
                f"| {r['method']} | {a['cos_mean']:.3f}{_ci(a, 'cos_mean')} | {a['norm_ratio']:.3f}"
                f"{_ci(a, 'norm_ratio')} | {cd['mean']:.3f} [{cd['q10']:.3f}, {cd['q90']:.3f}] | "
                f"{_snr(r, a_snr)}{_ci(a, 'snr')} | "
                + " | ".join(_fmt(v.get("cos_mean")) for k, v in r["groups"].items() if k != "all")
                + f" | {_fmt(r.get('activation_mib'), 1)} | {r['step_seconds']:.3f} | {r['step_cpu_seconds']:.3f} |"
            )
        if "picks" in res:
            md += ["", "Chosen on this set: " + json.dumps(res["picks"])]
        md.append("")
    path = Path(f"{stem}.md")
    path.write_text("\n".join(md) + "\n")
    paths = [path]
    for key, res in payload["results"].items():
        paths.append(Path(f"{stem}_{key.replace('/', '_')}.png"))
        plot_front(res["rows"], f"{payload['model']} model, {key}", paths[-1])
    return paths


def plot_front(rows: list[dict], title: str, path: Path) -> None:
    """Fidelity against activation memory and against CPU time per step: the mean gradient's cosine with g (top)
    and a single draw's (bottom), with the Pareto front (no other point has less cost and more fidelity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex="col")
    for col, (xkey, xlabel) in enumerate(
        (
            ("activation_mib", "activation memory (MiB, bench/memory.py count)"),
            ("step_cpu_seconds", "process CPU seconds per step (median; 2 shared cores)"),
        )
    ):
        for row_i, (ykey, ylabel) in enumerate(
            (("cos_mean", "cos(mean gradient, full-trajectory gradient)"), ("cos_draw", "cos(one draw, g): mean"))
        ):
            ax, pts = axes[row_i, col], []
            for r in rows:
                a, x = r["groups"]["all"], r.get(xkey)
                if x is None:
                    continue
                if ykey == "cos_mean":
                    y = a["cos_mean"]
                    ci = (a.get("ci") or {}).get("cos_mean") or [y, y]
                else:
                    y, ci = a["cos_draw"]["mean"], a["cos_draw"]["ci"]
                    ci = [y, y] if any(map(math.isnan, ci)) else ci
                shipped = ":" not in r["method"]
                ax.errorbar(
                    x,
                    y,
                    yerr=[[max(y - ci[0], 0)], [max(ci[1] - y, 0)]],
                    fmt="*" if shipped else "o",
                    ms=11 if shipped else 5,
                    capsize=3,
                )
                ax.annotate(r["method"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
                pts.append((x, y))
            front, best = [], -np.inf
            for x, y in sorted(pts):
                if y > best:
                    front.append((x, y))
                    best = y
            if front:
                ax.step(*zip(*front), where="post", color="grey", lw=1, label="Pareto front")
            ax.set(xscale="log", ylabel=ylabel if col == 0 else None)
            ax.grid(alpha=0.3)
            if row_i == 1:
                ax.set_xlabel(xlabel)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        f"{title} (stars: shipped defaults; bars: 95% intervals, bootstrap (top) and t over draws (bottom))",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def split_gram(payload: dict) -> dict:
    """Move each group's Gram matrix (K = D D^T of the draws, u = D g, gg = |g|^2) out of the payload into tensors
    named `<set>/N<n>/<method>/<group>/{K,u,gg}` (written beside the JSON as safetensors)."""
    import torch

    tensors = {}
    for key, res in payload.get("results", {}).items():
        for r in res["rows"]:
            for group, f in r["groups"].items():
                for name, value in f.pop("gram", {}).items():
                    tensors[f"{key}/{r['method']}/{group}/{name}"] = torch.as_tensor(value, dtype=torch.float64)
    return tensors


def replot(path: Path) -> list[Path]:
    """Tables and plots again from a result JSON (e.g. after a change of the plot)."""
    payload = json.loads(path.read_text())
    stem = path.with_suffix("")
    return write_tables(payload, stem) if "results" in payload else [write_closed_form_md(payload, stem)]


if __name__ == "__main__":
    sys.exit(main())

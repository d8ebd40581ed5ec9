"""Small-sample statistics for the benchmarks (no scipy): Student-t confidence intervals and paired t-tests.

mean_ci([...])            -> {"mean", "std", "n", "ci": [lo, hi]}        95% t interval of the mean
paired(a, b)              -> {"diff", "ci", "t", "p", "wins", "n"}       a - b paired by index (seed)
seeds_needed(sd, delta)   -> n   seeds for a paired t-test to detect a true difference delta (power 0.8)
seeds_for_halfwidth(sd, h)-> n   seeds for the 95% interval of a paired difference to be +-h wide at most
sd_ratio_interval(n)      -> (lo, hi)  95% interval of true sd / sample sd from n normal samples (chi-square)
"""

from __future__ import annotations

import functools
import math


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Numerical Recipes, modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: int) -> float:
    """Two-sided p-value P(|T| >= |t|) of Student's t with df degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@functools.lru_cache(maxsize=4096)  # seeds_needed asks for the same quantiles again and again
def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t, by bisection on the two-sided tail."""
    lo, hi, tail = 0.0, 1e4, 2.0 * (1.0 - q)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf2(mid, df) > tail else (lo, mid)
    return (lo + hi) / 2


def gammainc(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x): its series below a + 1, else 1 - the continued fraction of Q."""
    if x <= 0.0:
        return 0.0
    front = math.exp(a * math.log(x) - x - math.lgamma(a))
    if x < a + 1.0:
        term = total = 1.0 / a
        for n in range(1, 1000):
            term *= x / (a + n)
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return front * total
    tiny = 1e-300
    b, c, d = x + 1.0 - a, 1.0 / tiny, 1.0 / (x + 1.0 - a)
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return 1.0 - front * h


@functools.lru_cache(maxsize=256)
def chi2_quantile(q: float, df: int) -> float:
    """The q-quantile of the chi-square distribution with df degrees of freedom, by bisection on its CDF."""
    lo, hi = 0.0, 10.0 * df + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gammainc(df / 2.0, mid / 2.0) < q else (lo, mid)
    return (lo + hi) / 2


def sd_ratio_interval(n: int, level: float = 0.95) -> tuple[float, float]:
    """How far the true sd may lie from an sd measured on n normal samples: the interval of sigma / s,
    sqrt((n - 1) / chi2) at the upper and lower quantiles (about 0.66 to 2.0 at n = 8)."""
    a = (1.0 - level) / 2.0
    return math.sqrt((n - 1) / chi2_quantile(1.0 - a, n - 1)), math.sqrt((n - 1) / chi2_quantile(a, n - 1))


def mean_ci(x: list[float], level: float = 0.95) -> dict:
    n = len(x)
    mean = sum(x) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1)) if n > 1 else 0.0
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "ci": [mean - half, mean + half]}


def paired(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """a - b paired by position (same seed: same training and evaluation noise): mean difference, its t interval,
    t statistic, two-sided p and the number of pairs where a > b."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    s = mean_ci(d, level)
    se = s["std"] / math.sqrt(s["n"]) if s["n"] > 1 else math.nan
    t = s["mean"] / se if se and se > 0 else (math.inf if s["mean"] > 0 else -math.inf if s["mean"] < 0 else 0.0)
    p = t_sf2(t, s["n"] - 1) if math.isfinite(t) and s["n"] > 1 else (0.0 if s["mean"] else 1.0)
    return {"diff": s["mean"], "ci": s["ci"], "t": t, "p": p, "wins": sum(v > 0 for v in d), "n": s["n"]}


def _smallest(ok, n_max: int) -> int:
    """The smallest n in [2, n_max] with ok(n), for ok monotone in n (doubling, then bisection); n_max + 1 if none."""
    hi = 2
    while not ok(hi):
        if hi >= n_max:
            return n_max + 1
        hi = min(2 * hi, n_max)
    lo = hi // 2 if hi > 2 else 1  # ok(lo) is false (or lo < 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return max(hi, 2)


def seeds_needed(sd: float, delta: float, level: float = 0.95, power: float = 0.8, n_max: int = 100_000) -> int:
    """The smallest number of seeds n >= 2 at which a two-sided paired t-test at `level` finds a true mean
    difference `delta` with probability `power`, when one seed's difference has standard deviation `sd`: the
    smallest n with sqrt(n) |delta| / sd >= t((1 + level) / 2, n - 1) + t(power, n - 1), the usual t approximation
    of the noncentral t (it agrees with exact tables, e.g. 10 seeds for delta = sd and 34 for delta = sd / 2).
    n_max + 1 when even n_max seeds are not enough (delta 0)."""
    if sd < 0 or not 0.5 < power < 1 or not 0 < level < 1:
        raise ValueError(f"seeds_needed: need sd >= 0, 0.5 < power < 1, 0 < level < 1; got {sd}, {power}, {level}")
    if sd == 0:
        return 2
    return _smallest(
        lambda n: math.sqrt(n) * abs(delta) / sd >= t_quantile(0.5 + level / 2, n - 1) + t_quantile(power, n - 1),
        n_max,
    )


def seeds_for_halfwidth(sd: float, halfwidth: float, level: float = 0.95, n_max: int = 100_000) -> int:
    """The smallest number of seeds n >= 2 whose `level` t interval of a mean (or paired difference) is at most
    +- halfwidth wide when one seed has standard deviation `sd`: "answered either way" at that resolution (the
    interval then excludes 0 or excludes every difference larger than 2 x halfwidth)."""
    if sd == 0:
        return 2
    return _smallest(lambda n: t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) <= halfwidth, n_max)

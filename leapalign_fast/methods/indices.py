"""Index samplers shared by the methods: the (k, j) pair of LeapAlign and FlowBP-Bridge/-Lagrange (uniform, as
the LeapAlign paper, or Dirichlet-shaped, as FlowBP's configs) and FlowBP's late-biased draw of active steps.

Indices are forward trajectory indices: 0 is the noise end (t = 1), N - 1 the last step (t_{N-1} > 0).
"""

from __future__ import annotations

import numpy as np
import torch

from leapalign_fast.methods.base import draw_two_indices
from leapalign_fast.methods.settings import PairSettings


def draw_pair(s: PairSettings, num_steps: int, generator: torch.Generator) -> tuple[int, int]:
    """The (a, b) trajectory indices, a < b, of a pair method: uniform in its window, or Dirichlet-shaped."""
    lo, hi = s.window(num_steps)
    if s.index_sampler == "dirichlet":
        return draw_dirichlet_pair(lo, hi, s.dirichlet_alpha, generator)
    return draw_two_indices(lo, hi, generator)


def draw_dirichlet_pair(lo: int, hi: int, conc: list[float], generator: torch.Generator) -> tuple[int, int]:
    """(a, b), lo <= a < b < hi - 1, from a Dirichlet split of the window (FlowBP's `dirichlet` mode).

    Read from the clean end, the window's n = hi - lo steps are cut into three runs of lengths proportional to
    p ~ Dir(conc): the steps after j, the gap j..k, the steps before k (each rounded, at least 1, summing to n).
    So `conc[0]` places j, `conc[1]` the gap and `conc[2]` k; larger concentrations mean less spread.
    One seed is drawn from `generator`, and the Dirichlet draw uses its own stream (numpy) seeded by it.
    """
    n = hi - lo
    seed = int(torch.randint(2**31, (1,), generator=generator))
    p = np.random.default_rng(seed).dirichlet(np.asarray(conc, dtype=np.float64))
    lengths = np.round(p * n).astype(np.int64)
    lengths[int(np.argmax(p))] += n - lengths.sum()
    lengths = np.maximum(lengths, 1)
    lengths[int(np.argmax(lengths))] += n - lengths.sum()
    b = hi - 1 - int(lengths[0])
    a = b - int(lengths[1])
    return a, b


def draw_late_biased(lo: int, hi: int, count: int, bias: float, generator: torch.Generator) -> list[int]:
    """`count` distinct sorted indices from [lo, hi), P(i) proportional to (i - lo + 1) ** bias, drawn without
    replacement (bias 0: uniform; larger: nearer the clean end). The whole window if count >= its length."""
    if count >= hi - lo:
        return list(range(lo, hi))
    weights = torch.arange(1, hi - lo + 1, dtype=torch.float32) ** float(bias)
    picks = torch.multinomial(weights / weights.sum(), count, replacement=False, generator=generator)
    return sorted(lo + int(i) for i in picks.tolist())


def rescale_factor(weights: dict[int, float], active: list[int], strength: float) -> float:
    """FlowBP's gradient rescale `1 + strength (sum|w_all| / sum|w_active| - 1)`: at strength 1 the active
    velocities' gradient has the magnitude of all the weights they stand in for; 0 leaves it raw."""
    total, act = sum(abs(w) for w in weights.values()), sum(abs(weights[i]) for i in active)
    return 1.0 + strength * (total / act - 1.0) if strength > 0 and act > 1e-8 else 1.0

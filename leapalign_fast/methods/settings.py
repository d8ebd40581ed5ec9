"""Every method's settings: the `[method]` table as a dataclass, registered by name. Torch-free.

`config.load_config` types `[method]` with these as it reads the file, so a run's config is final before any heavy
import, and a bad method key fails in a fraction of a second. A method is this dataclass (one `@register` line)
plus its loss module `leapalign_fast/methods/<name>.py` (its `loss(inputs, settings)`).

Every `validate` raises a UserError naming `method.<key>` and the fix. `grad_graphs`, `grad_decodes` and
`decode_apart` tell the memory preflight what one sample keeps for the backward.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from leapalign_fast.errors import UserError

METHOD_SETTINGS: dict[str, type[MethodSettings]] = {}  # name -> settings dataclass, in registration order


def register(cls: type[MethodSettings]) -> type[MethodSettings]:
    """Class decorator: register a method's settings under its `name` default."""
    name = cls.__dataclass_fields__["name"].default
    if name in METHOD_SETTINGS:
        raise ValueError(f"method '{name}' is registered twice")
    METHOD_SETTINGS[name] = cls
    return cls


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


FLOAT32_MAX = 3.4028234663852886e38
LAM_MAX = 1e30  # |lam| * batch must stay a float32: the batch's hinge terms are summed


def max_late_bias(num_steps: int) -> float:
    """The largest `late_bias` whose draw weights (i + 1) ** late_bias, i < num_steps, and their sum stay finite in
    float32 (methods/indices.py draw_late_biased; a factor 2 of headroom for rounding)."""
    return math.inf if num_steps <= 1 else math.log(FLOAT32_MAX / (2 * num_steps)) / math.log(num_steps)


def check_late_bias(late_bias: float, num_steps: int) -> None:
    top = max_late_bias(num_steps)
    need(
        0 <= late_bias <= top,
        f"method.late_bias must be in [0, {top:.4g}] for num_steps={num_steps} (P(i) ~ (i + 1) ** late_bias: beyond "
        f"it the weights overflow float32), got {late_bias}",
    )


def check_grad_rescale(grad_rescale: float) -> None:
    need(
        0 <= grad_rescale <= 1,
        f"method.grad_rescale must be in [0, 1] (0: raw Euler weights; 1: the active steps carry the whole "
        f"trajectory's weight; beyond 1 they carry more, and the gradients grow without bound), got {grad_rescale}",
    )


def resolve_window(window: list[int], num_steps: int, min_span: int = 2) -> tuple[int, int]:
    """`[lo, hi)` trajectory-index window for (k, j); empty means the whole range [0, N)."""
    if num_steps < min_span:
        raise UserError(
            f"num_steps={num_steps} is too few for this method's (k, j) draw: it needs num_steps >= {min_span}"
        )
    lo, hi = (0, num_steps) if len(window) == 0 else (tuple(window) + (None,))[:2]
    if len(window) not in (0, 2) or hi is None or not (0 <= lo < hi <= num_steps) or hi - lo < min_span:
        raise UserError(
            f"method.index_window={list(window)} must be [] (whole trajectory) or [lo, hi) with "
            f"0 <= lo, lo + {min_span} <= hi <= num_steps={num_steps}; e.g. [0, {num_steps}]"
        )
    return lo, hi


@dataclass
class MethodSettings:
    """The `[method]` table: `name` picks the method; each method subclasses this with its own keys."""

    name: str = ""
    lam: float = 1.0  # hinge margin: loss = max(0, lam - reward)

    reference: ClassVar[bool] = False  # a memory/throughput reference, not an alignment method (bench/quality skips it)

    def validate(self, num_steps: int) -> None:
        """Raise UserError naming `method.<key>` for a bad value (only this method's keys). Subclasses call it."""
        need(
            abs(self.lam) <= LAM_MAX,
            f"method.lam must be in [-{LAM_MAX:g}, {LAM_MAX:g}] (the hinge margin, next to rewards of order 1; the "
            f"batch's loss sum overflows float32 beyond it), got {self.lam}",
        )

    def grad_graphs(self, num_steps: int) -> int:
        """Upper bound on the grad-enabled velocity forwards one sample keeps for the backward (memory preflight)."""
        return 2

    def grad_decodes(self) -> int:
        """Decodes (and reward forwards) one sample keeps for the backward."""
        return 1

    def decode_apart(self) -> bool:
        """True when the decode + reward backward is over before the grad forwards run (their graphs never
        coexist: the step needs the larger of the two, not the sum)."""
        return False

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


SAMPLERS = ("uniform", "dirichlet")


@dataclass
class PairSettings(MethodSettings):
    """Keys of every method that draws a (k, j) pair (`methods/indices.py` draws it)."""

    index_window: list[int] = field(default_factory=list)  # [lo, hi) trajectory indices for (k, j); [] = all
    index_sampler: str = "uniform"  # uniform (LeapAlign paper) | dirichlet (FlowBP configs)
    dirichlet_alpha: list[float] = field(default_factory=lambda: [2.5, 6.0, 2.0])  # (after j, j..k gap, before k)

    def validate(self, num_steps: int) -> None:
        super().validate(num_steps)
        need(
            self.index_sampler in SAMPLERS,
            f"method.index_sampler must be one of {', '.join(SAMPLERS)}, got '{self.index_sampler}'",
        )
        need(
            len(self.dirichlet_alpha) == 3 and all(a > 0 for a in self.dirichlet_alpha),
            f"method.dirichlet_alpha must be three positive numbers, got {self.dirichlet_alpha}",
        )
        self.window(num_steps)

    def window(self, num_steps: int) -> tuple[int, int]:
        return resolve_window(self.index_window, num_steps, min_span=3 if self.index_sampler == "dirichlet" else 2)


@register
@dataclass
class LeapAlignSettings(PairSettings):
    name: str = "leapalign"
    alpha: float = 0.3  # gradient discount of the nested term
    tau: float = 0.1  # distance floor of the similarity weight
    reward_first: bool = True  # decode + reward backward before the leap's grad forwards (2 more forwards, less memory)

    def validate(self, num_steps: int) -> None:
        need(0.0 <= self.alpha <= 1.0, f"method.alpha must be in [0, 1], got {self.alpha}")
        need(self.tau > 0, f"method.tau must be > 0, got {self.tau}")
        super().validate(num_steps)

    def decode_apart(self) -> bool:
        return self.reward_first


@register
@dataclass
class ReFLSettings(MethodSettings):
    name: str = "refl"
    late_fraction: float = 0.44  # the grad step is one of the last round(late_fraction * N) steps (11 of 25)
    late_steps: int = 0  # > 0: one of the last `late_steps` steps instead, for any N

    def count(self, num_steps: int) -> int:
        return self.late_steps if self.late_steps > 0 else max(1, round(self.late_fraction * num_steps))

    def grad_graphs(self, num_steps: int) -> int:
        return 1

    def validate(self, num_steps: int) -> None:
        super().validate(num_steps)
        need(0.0 < self.late_fraction <= 1.0, f"method.late_fraction must be in (0, 1], got {self.late_fraction}")
        need(
            0 <= self.late_steps <= num_steps,
            f"method.late_steps must be in [0, num_steps={num_steps}] (0: use method.late_fraction), "
            f"got {self.late_steps}",
        )


@register
@dataclass
class DraftSettings(MethodSettings):
    name: str = "draft"
    draft_k: int = 1  # backprop through the last K steps
    checkpointing: bool = False  # recompute the grad forwards in the backward (activation checkpointing)

    def grad_graphs(self, num_steps: int) -> int:
        return self.draft_k

    def validate(self, num_steps: int) -> None:
        super().validate(num_steps)
        n = num_steps
        need(1 <= self.draft_k <= n, f"method.draft_k must be in [1, num_steps={n}], got {self.draft_k}")


@register
@dataclass
class DraftLVSettings(MethodSettings):
    name: str = "draft_lv"
    renoise: int = 2  # re-noisings of the detached x_0

    def grad_graphs(self, num_steps: int) -> int:
        return self.renoise + 1

    def grad_decodes(self) -> int:
        return self.renoise + 1

    def validate(self, num_steps: int) -> None:
        super().validate(num_steps)
        need(self.renoise >= 0, f"method.renoise must be >= 0, got {self.renoise}")


DRTUNE_VARIANTS = ("published", "uniform")


@register
@dataclass
class DRTuneSettings(MethodSettings):
    name: str = "drtune"
    variant: str = "published"  # published (early stop, equally spaced steps) | uniform (ours: random steps, real x_0)
    drtune_steps: int = 3  # K trained steps
    early_stop_fraction: float = 0.4  # published: e is one of the last round(fraction * N) steps; 0: e = N - 1
    index_window: list[int] = field(default_factory=list)  # uniform: [lo, hi) the trained steps come from

    def grad_graphs(self, num_steps: int) -> int:
        return self.drtune_steps

    def validate(self, num_steps: int) -> None:
        super().validate(num_steps)
        variants = ", ".join(DRTUNE_VARIANTS)
        need(self.variant in DRTUNE_VARIANTS, f"method.variant must be one of {variants}, got '{self.variant}'")
        need(self.drtune_steps >= 1, f"method.drtune_steps must be >= 1, got {self.drtune_steps}")
        need(
            0.0 <= self.early_stop_fraction <= 1.0,
            f"method.early_stop_fraction must be in [0, 1], got {self.early_stop_fraction}",
        )
        if self.variant == "uniform":
            resolve_window(self.index_window, num_steps, min_span=1)


@register
@dataclass
class SparseSettings(MethodSettings):
    name: str = "flowbp_sparse"
    num_active_steps: int = 3  # K grad-enabled steps per trajectory
    late_bias: float = 2.0  # P(i) ~ (i + 1) ** late_bias; 0 = uniform
    grad_rescale: float = 1.0  # 0: raw Euler weights; 1: the active steps carry the whole trajectory's weight

    def grad_graphs(self, num_steps: int) -> int:
        return self.num_active_steps

    def validate(self, num_steps: int) -> None:
        super().validate(num_steps)
        need(self.num_active_steps >= 1, f"method.num_active_steps must be >= 1, got {self.num_active_steps}")
        check_late_bias(self.late_bias, num_steps)
        check_grad_rescale(self.grad_rescale)


@register
@dataclass
class BridgeSettings(PairSettings):
    name: str = "flowbp_bridge"
    alpha: float = 0.1  # gradient discount of the nested path through x_j
    num_active_steps: int = 5  # K grad-enabled steps, split around j
    late_bias: float = 2.0
    grad_rescale: float = 1.0

    def grad_graphs(self, num_steps: int) -> int:
        return self.num_active_steps

    def validate(self, num_steps: int) -> None:
        need(0.0 <= self.alpha <= 1.0, f"method.alpha must be in [0, 1], got {self.alpha}")
        need(
            self.num_active_steps >= 2,
            f"method.num_active_steps must be >= 2 (one each side of j), got {self.num_active_steps}",
        )
        check_late_bias(self.late_bias, num_steps)
        check_grad_rescale(self.grad_rescale)
        super().validate(num_steps)


SUPPORT_MODES = ("start", "midpoint", "all")
WEIGHT_SCHEMES = ("lagrange", "uniform")


@register
@dataclass
class LagrangeSettings(PairSettings):
    name: str = "flowbp_lagrange"
    alpha: float = 0.1  # gradient discount of the nested term
    tau: float = 0.2  # distance floor of the similarity weight
    index_sampler: str = "dirichlet"
    dirichlet_alpha: list[float] = field(default_factory=lambda: [2.5, 6.0, 2.0])
    connector_order: int = 3  # supports per interval
    support_mode: str = "midpoint"  # which supports get gradient: start | midpoint (first two) | all
    support_scale: float = 0.25  # gradient scale of the non-start active supports
    max_active_supports: int = 2  # per interval; 0 = no limit
    grad_rescale: float = 0.5
    anchor_lambda: float = 1.0  # 1: the Lagrange leap; 0: LeapAlign's Euler leap from v(x_k) for k -> j
    weight_scheme: str = "lagrange"  # lagrange | uniform (equal weights summing to t_e - t_s)

    def grad_graphs(self, num_steps: int) -> int:  # two intervals (k -> j, j -> 0)
        per = self.max_active_supports or self.connector_order
        return 2 * min(per, self.connector_order)

    def validate(self, num_steps: int) -> None:
        need(0.0 <= self.alpha <= 1.0, f"method.alpha must be in [0, 1], got {self.alpha}")
        need(self.tau > 0, f"method.tau must be > 0, got {self.tau}")
        need(self.connector_order >= 1, f"method.connector_order must be >= 1, got {self.connector_order}")
        need(
            self.support_mode in SUPPORT_MODES,
            f"method.support_mode must be one of {', '.join(SUPPORT_MODES)}, got '{self.support_mode}'",
        )
        need(self.support_scale >= 0, f"method.support_scale must be >= 0, got {self.support_scale}")
        need(self.max_active_supports >= 0, f"method.max_active_supports must be >= 0, got {self.max_active_supports}")
        check_grad_rescale(self.grad_rescale)
        need(0.0 <= self.anchor_lambda <= 1.0, f"method.anchor_lambda must be in [0, 1], got {self.anchor_lambda}")
        need(
            self.weight_scheme in WEIGHT_SCHEMES,
            f"method.weight_scheme must be one of {', '.join(WEIGHT_SCHEMES)}, got '{self.weight_scheme}'",
        )
        super().validate(num_steps)


@register
@dataclass
class FullSettings(MethodSettings):
    name: str = "full"
    checkpointing: bool = False  # recompute each grad forward in the backward (activation checkpointing)

    reference: ClassVar[bool] = True  # backprop through the whole trajectory: the memory/throughput reference

    def grad_graphs(self, num_steps: int) -> int:
        return num_steps

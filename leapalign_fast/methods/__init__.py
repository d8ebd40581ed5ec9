"""Methods: one module each (its settings dataclass, its loss builder, its `METHOD` entry), found through `METHODS`.

Adding a method is one module plus one line below. `[method]` in a config picks one by `name`; its other keys are
that method's settings (leapalign_fast.config builds and validates them), and `build_method` binds them.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

from leapalign_fast.errors import UserError
from leapalign_fast.methods import (
    draft,
    draft_lv,
    drtune,
    flowbp_bridge,
    flowbp_lagrange,
    flowbp_sparse,
    full,
    leapalign,
    refl,
)
from leapalign_fast.methods.base import MethodSettings, MethodSpec, StepInputs, StepOutput

LossBuilder = Callable[[StepInputs], StepOutput]

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        leapalign.METHOD,
        refl.METHOD,
        draft.METHOD,
        draft_lv.METHOD,
        drtune.METHOD,
        flowbp_sparse.METHOD,
        flowbp_bridge.METHOD,
        flowbp_lagrange.METHOD,
        full.METHOD,
    )
}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}.{hint}")
    return METHODS[name]


def method_settings(name: str, **values) -> MethodSettings:
    """The settings of method `name`: its defaults, with `values` replacing some."""
    return method_spec(name).settings(name=name, **values)


def build_method(settings: MethodSettings, num_steps: int) -> LossBuilder:
    """Bind a method's settings (validated here too: bad settings fail at start); returns `inputs -> StepOutput`."""
    spec = method_spec(settings.name)
    if type(settings) is MethodSettings:  # only name and lam given: the method's defaults for the rest
        settings = spec.settings(**dataclasses.asdict(settings))
    if not isinstance(settings, spec.settings):
        raise TypeError(f"method '{spec.name}' takes {spec.settings.__name__}, got {type(settings).__name__}")
    settings.validate(num_steps)
    return lambda inp: spec.loss(inp, settings)


__all__ = ["METHODS", "MethodSettings", "MethodSpec", "StepInputs", "StepOutput", "build_method", "method_settings",
           "method_spec"]  # fmt: skip

"""Methods: one module each (its settings dataclass, its loss builder, its `METHOD` entry), found through `METHODS`.

Adding a method is one module plus one line below (and its name in `config.METHOD_NAMES`). `[method]` in a config
picks one by `name`; its other keys are that method's settings, built and validated from the raw table by
`with_method_settings` (config.py stays a leaf without torch), and `build_method` binds them.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Callable

from leapalign_fast.config import METHOD_NAMES, Config, MethodTable, check_numbers, check_type
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
assert tuple(METHODS) == METHOD_NAMES, "config.METHOD_NAMES must list the registry's methods, in its order"


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}.{hint}")
    return METHODS[name]


def method_settings(name: str, **values) -> MethodSettings:
    """The settings of method `name`: its defaults, with `values` replacing some."""
    return method_spec(name).settings(name=name, **values)


def settings_from_table(table: dict, num_steps: int) -> MethodSettings:
    """The `[method]` table as the chosen method's settings, validated. Keys that belong only to other methods are
    ignored, so one file can switch methods with `method.name=...`; errors name only the chosen method's keys."""
    name = table.get("name", "leapalign")
    cls = method_spec(name).settings
    hints, own = typing.get_type_hints(cls), set(cls.keys())
    others = {k for m in METHODS.values() for k in m.settings.keys()} - own
    kwargs = {}
    for key, value in table.items():
        if key in own:
            kwargs[key] = check_type(f"method.{key}", value, hints[key])
        elif key not in others:
            close = difflib.get_close_matches(key, sorted(own), n=1, cutoff=0.5)
            takes = ", ".join(sorted(own))
            hint = f"; did you mean 'method.{close[0]}'?" if close else f"; method '{name}' takes {takes}"
            raise UserError(f"unknown config key 'method.{key}'{hint}")
    settings = cls(**kwargs)
    check_numbers(settings, "method.")
    settings.validate(num_steps)  # only the chosen method's keys
    return settings


def with_method_settings(cfg: Config) -> Config:
    """`cfg` with its raw `[method]` table replaced by the chosen method's settings dataclass, validated (a bad key
    or value is a UserError). Torch, but none of the model stack: the CLI calls it before the heavy imports."""
    if isinstance(cfg.method, MethodTable):
        cfg = dataclasses.replace(cfg, method=settings_from_table(cfg.method, cfg.num_steps))
    else:
        cfg.method.validate(cfg.num_steps)
    if cfg.mixed_precision == "fp16" and cfg.method.decode_apart():
        raise UserError(f"method '{cfg.method.name}' with method.reward_first=true takes the reward's gradient before "
                        "the trainer's backward, outside fp16's loss scaling (small gradients would underflow); use "
                        "mixed_precision='bf16' or 'no', or method.reward_first=false")  # fmt: skip
    return cfg


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
           "method_spec", "settings_from_table", "with_method_settings"]  # fmt: skip

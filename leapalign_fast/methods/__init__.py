"""Methods: each is a settings dataclass (`methods/settings.py`, registered by name) and a loss module
`methods/<name>.py` holding `METHOD = MethodSpec(<its settings>, <its loss>)`.

`[method]` in a config picks one by `name`; `config.load_config` already returns its settings, typed and validated.
`build_method` binds them to the loss. Importing this package is torch-free: the loss modules (torch) load on first
use, so the config layer can import the settings registry.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import TYPE_CHECKING, Callable

from leapalign_fast.errors import UserError
from leapalign_fast.methods.settings import METHOD_SETTINGS, MethodSettings

if TYPE_CHECKING:
    from leapalign_fast.methods.base import MethodSpec, StepInputs, StepOutput

    LossBuilder = Callable[[StepInputs], StepOutput]


def method_spec(name: str) -> MethodSpec:
    """The registry entry of method `name` (its loss module is imported here)."""
    if name not in METHOD_SETTINGS:
        close = difflib.get_close_matches(name, METHOD_SETTINGS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHOD_SETTINGS))}.{hint}")
    spec = importlib.import_module(f"leapalign_fast.methods.{name}").METHOD
    assert spec.settings is METHOD_SETTINGS[name], f"methods/{name}.py must use the registered settings of '{name}'"
    return spec


def method_settings(name: str, **values) -> MethodSettings:
    """The settings of method `name`: its defaults, with `values` replacing some."""
    method_spec(name)  # the name checked, with a hint
    return METHOD_SETTINGS[name](name=name, **values)


def build_method(settings: MethodSettings, num_steps: int) -> LossBuilder:
    """Bind a method's settings (validated here too: bad settings fail at start); returns `inputs -> StepOutput`."""
    spec = method_spec(settings.name)
    if type(settings) is MethodSettings:  # only name and lam given: the method's defaults for the rest
        settings = spec.settings(**dataclasses.asdict(settings))
    if not isinstance(settings, spec.settings):
        raise TypeError(f"method '{spec.name}' takes {spec.settings.__name__}, got {type(settings).__name__}")
    settings.validate(num_steps)
    return lambda inp: spec.loss(inp, settings)


def __getattr__(name: str):
    """`METHODS` (name -> MethodSpec, every loss module imported) and the step types, loaded on first use."""
    if name == "METHODS":
        return {n: method_spec(n) for n in METHOD_SETTINGS}
    if name in ("MethodSpec", "StepInputs", "StepOutput"):
        return getattr(importlib.import_module("leapalign_fast.methods.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "METHOD_SETTINGS",
    "MethodSettings",
    "MethodSpec",
    "StepInputs",
    "StepOutput",
    "build_method",
    "method_settings",
    "method_spec",
]

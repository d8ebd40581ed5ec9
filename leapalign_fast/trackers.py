"""Experiment trackers (`report_to`): TensorBoard and Weights & Biases through accelerate's tracker API.

The trainer builds the trackers with its Accelerator (`Accelerator(log_with=make_trackers(cfg))`), starts them once
the step it resumes from is known (`start`: the resolved config goes to each), then logs through the accelerator:
scalars with `accelerator.log`, images with each tracker's `log_images`. Every tracker gets the same values; only
the main process writes. metrics.jsonl is written beside them, whatever `report_to` says.

    tensorboard  <output_dir>/tensorboard/ (events after a resumed step are purged, as a resumed run rewrites them)
    wandb        a W&B run in project $WANDB_PROJECT (default: leapalign-fast), named after output_dir, its local
                 files in <output_dir>/wandb/; WANDB_MODE=offline writes them without a network (`wandb sync` later).
                 A resumed run is a new W&B run of the same name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from leapalign_fast.errors import UserError

REPORT_TO = ("tensorboard", "wandb")
WANDB_PROJECT = "leapalign-fast"


def check_available(names: list[str]) -> None:
    """A UserError naming the install when a tracker's package is missing (wandb is an optional dependency)."""
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise UserError(
            "report_to names 'wandb', which is not installed; pip install 'leapalign-fast[wandb]' (or wandb), or "
            'drop it: report_to="tensorboard"'
        )


def make_trackers(cfg) -> list:
    """accelerate tracker objects for `cfg.report_to` (not started yet), for `Accelerator(log_with=...)`."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    check_available(cfg.report_to)
    out = Path(cfg.output_dir)
    trackers = []
    for name in cfg.report_to:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", str(out)))
        elif name == "wandb":
            project = os.environ.get("WANDB_PROJECT", WANDB_PROJECT)
            trackers.append(WandBTracker(project, dir=str(out), name=out.resolve().name))
    return trackers


def flat_config(cfg) -> dict[str, bool | int | float | str]:
    """The resolved config as one level of dotted keys (`method.alpha`), lists and tables as JSON text: the form
    every tracker takes (TensorBoard's hparams accept only scalars)."""

    def flatten(value, prefix: str, out: dict) -> dict:
        for key, v in value.items():
            if isinstance(v, dict) and v:
                flatten(v, f"{prefix}{key}.", out)
            elif isinstance(v, (bool, int, float, str)):
                out[prefix + key] = v
            else:
                out[prefix + key] = json.dumps(v)
        return out

    return flatten(dataclasses.asdict(cfg), "", {})


def start(accelerator, cfg, step: int) -> None:
    """Start the accelerator's trackers at `step` (0, or the step a resume continues from) with the config."""
    from accelerate.tracking import TensorBoardTracker

    for tracker in accelerator.log_with:
        if isinstance(tracker, TensorBoardTracker):  # SummaryWriter(purge_step): hide the old run's later events
            tracker.init_kwargs["purge_step"] = step + 1
    accelerator.init_trackers(WANDB_PROJECT, config=flat_config(cfg))


def log_scalars(accelerator, record: dict, step: int) -> None:
    """The numbers of a metrics record (None: not finite, left out; bools as 0/1) to every tracker."""
    values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    if values:
        accelerator.log(values, step=step)


def log_image(accelerator, name: str, image: np.ndarray, step: int) -> None:
    """One (H, W, 3) uint8 image (a grid) to every tracker that takes images."""
    batch = image[None]  # (1, H, W, 3)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: batch}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: batch}, step=step)


def finish(accelerator, failed: bool = False) -> None:
    """Close every tracker (flushes TensorBoard, ends the W&B run, marked failed after an error or a signal);
    `accelerator.end_training` then finds none."""
    for tracker in accelerator.trackers:
        if failed and tracker.name == "wandb":
            tracker.run.finish(exit_code=1)
        else:
            tracker.finish()
    accelerator.trackers.clear()

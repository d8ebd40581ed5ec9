"""The run's trackers (`report_to`, leapalign_fast/trackers.py): a tiny run logs the same scalars, images and
config to TensorBoard and to Weights & Biases (offline), read back from the files each one wrote."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml

from leapalign_fast.config import load_config
from leapalign_fast.errors import UserError
from leapalign_fast.rewards import register_reward
from leapalign_fast.trackers import flat_config

FAST = ["batch_size=2", "num_steps=4", "max_steps=3", "checkpoint_every=3", "lr=1e-2"]


def wandb_records(path: Path) -> list:
    """The protobuf Records of a W&B run file (`run-<id>.wandb`): a 7-byte header (':W&B', magic, version), then
    LevelDB-log chunks in 32 KiB blocks, each `crc32c (4) | length (2) | type (1: full, 2 first, 3 middle, 4 last)`,
    a block's tail shorter than a chunk header padded with zeros."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zeros: preallocated space after the last record
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(out: Path) -> tuple[dict, dict, dict, int | None]:
    """(scalars {name: {step: value}}, images {name: [steps]}, config {key: value}, exit code) of the one offline
    W&B run in `out`."""
    import wandb

    wandb.teardown()  # W&B's service process writes the file behind the run: stopping it flushes the last records
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    scalars, images, config, exit_code = {}, {}, {}, None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {}  # an image is one item per field, its key the path (name, field)
            for item in record.history.item:
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                node = row
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = json.loads(item.value_json)
            step = row["_step"]
            for key, value in row.items():
                if key.startswith("_"):
                    continue
                if isinstance(value, dict) and value.get("_type") == "images/separated":
                    images.setdefault(key, []).append(step)
                elif isinstance(value, (int, float)):  # val/reward is one key with a slash, not a path
                    scalars.setdefault(key, {})[step] = value
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return scalars, images, config, exit_code


def tensorboard_run(logdir: Path) -> tuple[dict, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = acc.Tags()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags["scalars"]}
    images = {t: [e.step for e in acc.Images(t)] for t in tags["images"]}
    return scalars, images


def _wandb_offline(tmp_path, monkeypatch) -> None:
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")  # no system-metrics sampler beside a seconds-long test


@pytest.mark.slow  # about 5 s of CPU: a 3-step run with validation, W&B's service process
def test_tensorboard_and_wandb_offline_get_the_same_scalars_images_and_config(tmp_path, monkeypatch):
    from leapalign_fast.train import train

    _wandb_offline(tmp_path, monkeypatch)
    (tmp_path / "val.txt").write_text("a red circle\ntwo blue squares\n")
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "report_to=['tensorboard', 'wandb']",
        "eval_every=2",
        f"eval_prompt_file={tmp_path / 'val.txt'}",
        *FAST,
    ]
    cfg = load_config(None, overrides)
    out = Path(train(cfg).output_dir)

    tb_scalars, tb_images = tensorboard_run(out / "tensorboard")
    wb_scalars, wb_images, wb_config, exit_code = wandb_run(out)
    assert exit_code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    numeric = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert {"loss", "reward", "grad_norm", "lr", "skipped"} <= numeric
    assert numeric <= set(tb_scalars) and set(tb_scalars) == set(wb_scalars)
    assert tb_scalars["val/reward"].keys() == {0, 2, 3}  # validation at 0, every 2 steps and at the end
    for name, by_step in tb_scalars.items():
        assert by_step.keys() == wb_scalars[name].keys(), name
        for step, value in by_step.items():  # TensorBoard stores float32
            assert value == pytest.approx(wb_scalars[name][step], rel=1e-6, abs=1e-30), (name, step)
    for r in rows:  # and the values are metrics.jsonl's
        assert tb_scalars["loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    assert tb_images == wb_images == {"grid": [0, 3], "val/images": [0, 2, 3]}
    flat = flat_config(cfg)
    assert {k: wb_config[k] for k in flat} == flat and flat["report_to"] == '["tensorboard", "wandb"]'
    (hparams,) = (out / "tensorboard").glob("*/hparams.yml")  # TensorBoard's copy of the hparams it logged
    assert yaml.safe_load(hparams.read_text()) == flat
    assert flat["method.name"] == "leapalign" and flat["reward.options"] == "{}"


def test_report_to_values():
    assert load_config(None, []).report_to == ["tensorboard"]
    assert load_config(None, ["report_to=none"]).report_to == []
    assert load_config(None, ["report_to=wandb"]).report_to == ["wandb"]
    assert load_config(None, ["report_to=['wandb', 'tensorboard']"]).report_to == ["wandb", "tensorboard"]
    with pytest.raises(UserError, match="report_to: unknown tracker 'mlflow'; use tensorboard, wandb"):
        load_config(None, ["report_to=mlflow"])
    with pytest.raises(UserError, match="report_to names a tracker twice"):
        load_config(None, ["report_to=['wandb', 'wandb']"])
    with pytest.raises(UserError, match="'tensorboard' was replaced by report_to"):
        load_config(None, ["tensorboard=false"])


def test_a_missing_wandb_is_one_line(tmp_path, monkeypatch):
    """wandb is optional: report_to=wandb without it names the install before anything is built."""
    import importlib.util

    from leapalign_fast.train import Trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"report_to names 'wandb', which is not installed; pip install"):
        Trainer(load_config(None, [f"output_dir={tmp_path}", "report_to=wandb", *FAST]))
    assert not any(tmp_path.iterdir())


@register_reward("test_nan_reward")
def _nan_reward():
    class NaN(torch.nn.Module):
        def forward(self, images, prompts):
            return images.mean(dim=(1, 2, 3)) * float("nan")

    return NaN()


def test_a_failed_run_ends_its_wandb_run_as_failed(tmp_path, monkeypatch):
    """A run that stops on an error (here: diverged) closes its trackers, the W&B run with exit code 1."""
    from leapalign_fast.errors import TrainingDiverged
    from leapalign_fast.train import train

    _wandb_offline(tmp_path, monkeypatch)
    overrides = [f"output_dir={tmp_path / 'run'}", "report_to=wandb", "reward.name=test_nan_reward", *FAST]
    with pytest.raises(TrainingDiverged):
        train(load_config(None, [*overrides, "max_nonfinite_steps=1", "reward.options={}"]))
    assert wandb_run(tmp_path / "run")[3] == 1

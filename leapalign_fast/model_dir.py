"""A trained transformer as a diffusers model directory: `config.json` + `diffusion_pytorch_model.safetensors`, which
`<Model>.from_pretrained` and the pipeline (`transformer=`) load. Written into a staging folder, then renamed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from leapalign_fast.io import save_tensors_atomic, write_json_atomic


def model_config(transformer: torch.nn.Module) -> dict:
    """The bare transformer's diffusers config, with its `_class_name` (an FSDP wrapper's name stripped)."""
    config = dict(transformer.config)
    config["_class_name"] = type(transformer).__name__.removeprefix("FSDP")
    return json.loads(json.dumps(config, default=str))


def write_model_dir(weights: dict[str, torch.Tensor], config: dict, target: Path) -> Path:
    """`weights` (full tensors by state_dict name, in the dtype to store) and `config` as the directory `target`."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in weights.items()}
    save_tensors_atomic(tensors, tmp / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    write_json_atomic(tmp / "config.json", config)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target

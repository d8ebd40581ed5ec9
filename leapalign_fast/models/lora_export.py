"""LoRA weights in the format a backbone's diffusers pipeline reads (`<Pipeline>.load_lora_weights`), written
atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from leapalign_fast.io import fsync_dir


def export_lora(
    transformer, directory: str | Path, weights: dict[str, torch.Tensor] | None = None, pipeline: str = "FluxPipeline"
) -> Path:
    """Save the transformer's LoRA adapter (or `weights`, e.g. an EMA, keyed like its named_parameters)
    as `<directory>/pytorch_lora_weights.safetensors`, through `pipeline` (the backbone's diffusers pipeline
    class name) so that its `load_lora_weights` reads it. `transformer` is the bare peft-adapted module."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    sharded = any(type(p).__name__ == "DTensor" for p in transformer.parameters())
    if sharded:  # FSDP: the parameters are shards; `weights` holds the gathered full tensors
        if weights is None:
            raise ValueError("a sharded transformer's LoRA export needs the gathered weights")
        state = get_peft_model_state_dict(transformer, state_dict=dict(weights))
        state = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
        weights = None
    if weights is not None:  # swap the given weights in for the export, then restore
        named = dict(transformer.named_parameters())
        saved = {n: named[n].detach().clone() for n in weights}
        with torch.no_grad():
            for n, t in weights.items():
                named[n].copy_(t)
    try:
        # clone: on CPU `.cpu()` returns the parameter itself, which the restore below would overwrite
        if not sharded:
            state = {
                k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(transformer).items()
            }
    finally:
        if weights is not None:
            with torch.no_grad():
                for n, t in saved.items():
                    named[n].copy_(t)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # The adapter's config (rank, lora_alpha, targets) goes into the file's metadata: without it diffusers
        # would assume lora_alpha == rank and load a differently scaled adapter.
        metadata = transformer.peft_config["default"].to_dict()
        getattr(diffusers, pipeline).save_lora_weights(
            tmp, transformer_lora_layers=state, safe_serialization=True, transformer_lora_adapter_metadata=metadata
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    return target / "pytorch_lora_weights.safetensors"

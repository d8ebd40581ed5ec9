"""The transformer's repeated blocks: the unit that FSDP shards, regional compile compiles and checkpointing wraps."""

from __future__ import annotations

import torch


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Instances of the model's repeated block classes (diffusers' `_repeated_blocks`), in module order; for a model
    that names none (SD3Transformer2DModel), the elements of its top-level block lists (`transformer_blocks`, ...).
    Empty when the model has neither."""
    classes = set(getattr(transformer, "_repeated_blocks", ()) or ())
    units = [m for m in transformer.modules() if type(m).__name__ in classes]
    if not units:
        lists = [c for c in transformer.children() if isinstance(c, torch.nn.ModuleList) and len(c) > 0]
        units = [block for blocks in lists for block in blocks]
    return units

"""Checks before the first training step: does the step fit in memory, which mixed precision is used.

The memory estimate is a deliberate lower bound (few activations per layer, one VAE decode per graph), so a
run it refuses cannot fit; runs it lets through may still run out of memory, as any estimate allows.
"""

from __future__ import annotations

import os

import torch

from leapalign_fast.errors import UserError

GIB = 1 << 30


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the step will run: GPU (the driver's count, as NVML reports it) or MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def step_bytes(cfg, backbone, components, geometry) -> int:
    """Lower bound on the bytes one optimizer micro-step keeps alive on its device (`geometry`: the backbone's
    latent layout at cfg.image_size)."""
    tc = components.transformer.config
    elem = 4 if cfg.model.dtype == "float32" and cfg.mixed_precision == "no" else 2
    tokens = geometry.tokens + cfg.model.max_sequence_length
    if backbone.transformer_size is not None:
        hidden, layers = backbone.transformer_size(tc)
    else:
        hidden = tc.num_attention_heads * tc.attention_head_dim
        layers = tc.num_layers + getattr(tc, "num_single_layers", 0)  # FLUX's single-stream blocks
    # draft and full carry their own activation-checkpointing switch
    checkpointed = cfg.model.gradient_checkpointing or getattr(cfg.method, "checkpointing", False)
    per_forward = tokens * hidden * layers * (1 if checkpointed else 6) * elem
    graphs = cfg.method.grad_graphs(cfg.num_steps)
    widest = backbone.decoder_width(components.vae)
    height, width = cfg.image_size
    # every frame of a video; a recomputed video decode (checkpoint_decode) holds about one frame's graph at a time
    frames = 1 if cfg.model.checkpoint_decode else getattr(cfg, "num_frames", 1)
    per_decode = height * width * frames * widest * 3 * elem
    decodes = cfg.method.grad_decodes()
    latents = tokens * geometry.channels * 4 * (cfg.num_steps + 1)  # the trajectory
    grad = (max if cfg.method.decode_apart() else sum)((graphs * per_forward, decodes * per_decode))
    return cfg.batch_size * (grad + latents)


def check_memory(cfg, backbone, components, geometry, device: torch.device) -> None:
    """A UserError naming the estimate when one micro-step cannot fit in the free memory of `device`."""
    need, free = step_bytes(cfg, backbone, components, geometry), available_bytes(device)
    if free is not None and need > free:
        raise UserError(
            f"one training step needs at least {need / GIB:.1f} GiB on {device.type} "
            f"(batch_size={cfg.batch_size}, image {cfg.image_size[0]}x{cfg.image_size[1]}, method {cfg.method.name}), "
            f"{free / GIB:.1f} GiB is free; lower batch_size (use grad_accum), resolution or the method's "
            "step counts, or enable model.gradient_checkpointing"
        )


def mixed_precision_note(cfg) -> str | None:
    """`accelerate launch --config_file` passes its mixed_precision in the environment; the run config wins."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != cfg.mixed_precision:
        return (
            f"the accelerate launch config says mixed_precision={launcher}; the run config's "
            f"mixed_precision='{cfg.mixed_precision}' is used (set it there to change it)"
        )
    return None

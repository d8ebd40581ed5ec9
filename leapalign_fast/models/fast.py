"""Speed switches on an unchanged diffusers FLUX transformer, each guarded and independently off-able:
attention backend, activation checkpointing, torch.compile (regional or whole), CUDA-graph no-grad forwards.

Order (torchtitan's): activation checkpointing, then compile, then DDP/FSDP wrapping (by accelerate, later).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable

import torch

from leapalign_fast.errors import UserError

log = logging.getLogger("leapalign_fast")

ATTENTION_BACKENDS = ("auto", "native", "flash", "_flash_3", "_native_flash", "_native_cudnn", "flex")


def resolve_attention(name: str, device: torch.device) -> str:
    """`auto`: FlashAttention (flash-attn package) on CUDA when installed, else PyTorch SDPA (`native`)."""
    if name not in ATTENTION_BACKENDS:
        raise UserError(f"model.attention='{name}' is not one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":
        return "flash" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "native"
    if name in ("flash", "_flash_3") and importlib.util.find_spec("flash_attn" if name == "flash" else "flash_attn_interface") is None:
        raise UserError(f"model.attention='{name}' needs the flash-attn package; install it or use 'native' (SDPA)")
    return name


def prepare_transformer(transformer, model_cfg, device: torch.device) -> str:
    """Apply the configured switches in place; returns a one-line description for the run log."""
    backend = resolve_attention(model_cfg.attention, device)
    if backend != "native":
        transformer.set_attention_backend(backend)
    parts = [f"attention={backend}"]
    if model_cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()  # only grad-enabled forwards recompute
        parts.append("activation-checkpointing")
    if model_cfg.compile != "none":
        compile_transformer(transformer, model_cfg.compile, model_cfg.compile_backend)
        parts.append(f"compile={model_cfg.compile}/{model_cfg.compile_backend}")
    return ", ".join(parts)


def compile_transformer(transformer, mode: str, backend: str = "inductor") -> None:
    """`regional`: each repeated block compiled with fullgraph=True (fast to compile, same speed);
    `full`: the whole forward with fullgraph=True. In place (nn.Module.compile), so names and state_dict keys,
    LoRA and checkpoints are unchanged."""
    if mode == "regional":
        transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
    elif mode == "full":
        transformer.compile(fullgraph=True, backend=backend)
    else:
        raise UserError(f"model.compile='{mode}' must be none, regional or full")


def capture_cuda_graph(forward: Callable[[], torch.Tensor], warmup: int) -> tuple[Callable[[], None], torch.Tensor]:
    """Run `forward()` `warmup` times on a side stream (lazy inits, autotuning), then capture it in a CUDA graph.

    Returns (replay, static output). A replay reads the very memory the capture read: every tensor `forward`
    reads must stay alive and be refilled in place before each replay.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(warmup):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = forward()
    return graph.replay, out


class GraphedVelocity:
    """A velocity whose no-grad calls on CUDA replay a captured CUDA graph (one per input signature).

    Grad-enabled calls (LeapAlign's two trained forwards) and anything on CPU run the wrapped velocity eagerly,
    so the sampler and the methods are the same code with or without graphs. The graph's inputs are static
    buffers owned here: x, t and every conditioning tensor of the velocity (`velocity.conditioning()`: for FLUX
    T5, pooled, img_ids, txt_ids, guidance) are copied in before each replay; the output is cloned, so a later
    replay cannot overwrite a result the caller still holds. Parameters are updated in place by the optimizer,
    so a captured graph always sees the current weights.

    `capture` and `device_types` exist for tests: a CPU stand-in for `capture_cuda_graph` checks the binding.
    """

    def __init__(self, nograd_transformer, warmup: int = 2, capture=capture_cuda_graph, device_types=("cuda",)):
        # The graphs run the bare module: a DDP/FSDP wrapper's forward must not be captured.
        self.transformer, self.velocity, self.warmup = nograd_transformer, None, warmup
        self.capture, self.device_types = capture, device_types
        self.graphs: dict[tuple, tuple[Callable[[], None], dict[str, torch.Tensor | None]]] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type not in self.device_types:
            return self.velocity(x, t)
        inputs = {"x": x, "t": t, **self.velocity.conditioning()}
        key = tuple((n, None) if v is None else (n, tuple(v.shape), v.dtype, v.device) for n, v in inputs.items())
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        replay, static = self.graphs[key]
        fill_static(static, inputs)
        replay()
        return static["out"].clone()

    def bind(self, velocity) -> "GraphedVelocity":
        """Reuse the captured graphs for a new batch of conditioning (same shapes): its tensors are copied in."""
        self.velocity = velocity
        return self

    def _capture(self, inputs: dict[str, torch.Tensor | None]):
        static = {n: None if v is None else v.clone() for n, v in inputs.items()}  # owned here, never freed
        x, t = static["x"], static["t"]
        # Built from the bare transformer and the static buffers only: nothing the graph reads is created inside
        # the capture or borrowed from the caller's velocity.
        velocity = self.velocity.with_conditioning({n: v for n, v in static.items() if n not in ("x", "t")})
        velocity.transformer = self.transformer
        replay, static["out"] = self.capture(lambda: velocity(x, t), self.warmup)
        return replay, static


def fill_static(static: dict[str, torch.Tensor | None], inputs: dict[str, torch.Tensor | None]) -> None:
    """Copy each input into its static buffer (same shape, dtype and device: the graph key guarantees it)."""
    for name, value in inputs.items():
        if value is not None:
            static[name].copy_(value)

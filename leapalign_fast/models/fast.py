"""Speed switches on an unchanged diffusers FLUX transformer, each guarded and independently off-able:
attention backend, activation checkpointing, torch.compile (regional or whole), CUDA-graph no-grad forwards.

Order (torchtitan's): activation checkpointing, then compile, then DDP/FSDP wrapping (by accelerate, later).
"""

from __future__ import annotations

import importlib.util
import logging

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


class GraphedVelocity:
    """A velocity whose no-grad calls on CUDA replay a captured CUDA graph (one per input shape).

    Grad-enabled calls (LeapAlign's two trained forwards) and anything on CPU run the wrapped velocity eagerly,
    so the sampler and the methods are the same code with or without graphs. Inputs are copied into static
    buffers and outputs cloned, so a later replay cannot overwrite a result the caller still holds. Parameters
    are updated in place by the optimizer, so a captured graph always sees the current weights.
    """

    def __init__(self, nograd_transformer, warmup: int = 2):
        # The graphs run the bare module: a DDP/FSDP wrapper's forward must not be captured.
        self.transformer, self.velocity, self.warmup = nograd_transformer, None, warmup
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not x.is_cuda:
            return self.velocity(x, t)
        key = (tuple(x.shape), x.dtype, tuple(self.velocity.t5.shape))
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t)
        graph, static = self.graphs[key]
        for name, value in (("x", x), ("t", t), ("t5", self.velocity.t5), ("pooled", self.velocity.pooled)):
            static[name].copy_(value)
        graph.replay()
        return static["out"].clone()

    def bind(self, velocity) -> "GraphedVelocity":
        """Reuse the captured graphs for a new batch of conditioning (same shapes): the buffers are copied in."""
        self.velocity = velocity
        return self

    def _capture(self, x, t):
        v = self.velocity
        static = {"x": x.clone(), "t": t.clone(), "t5": v.t5.clone(), "pooled": v.pooled.clone()}
        eager = type(v)(self.transformer, static["t5"], static["pooled"], v.img_ids, None)
        eager.guidance = v.guidance
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.warmup):  # lazy inits and autotuning happen outside the capture
                eager(static["x"], static["t"])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static["out"] = eager(static["x"], static["t"])
        return graph, static

"""Speed switches on an unchanged diffusers FLUX transformer, each guarded and independently off-able:
attention backend, activation checkpointing, torch.compile (regional or whole), CUDA-graph no-grad forwards.

Order (torchtitan's): activation checkpointing, then compile, then DDP/FSDP wrapping (by accelerate, later).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Callable

import torch

from leapalign_fast.blocks import repeated_blocks
from leapalign_fast.errors import UserError

log = logging.getLogger("leapalign_fast")

ATTENTION_BACKENDS = (
    "auto",
    "native",
    "flash",
    "_flash_3",
    "_native_flash",
    "_native_cudnn",
    "_native_efficient",
    "flex",
)
# diffusers runs these as forward-only custom ops (no autograd formula): LeapAlign's backward would fail.
NO_BACKWARD = ("_flash_3", "_flash_varlen_3")
HALF_ONLY = ("flash", "_flash_3", "_native_flash", "_native_cudnn")  # q, k, v must be bf16/fp16
PACKAGES = {"flash": "flash-attn", "_flash_3": "FlashAttention 3 (flash_attn_interface)"}
FLASH_COMPILE_VERSION = (2, 7)  # flash-attn registers its ops for torch.compile (fullgraph) from 2.7 on


def _diffusers_problem(name: str) -> str | None:
    """diffusers' own verdict on a backend (installed package, version, import), or None when usable."""
    try:
        from diffusers.models import attention_dispatch as ad

        ad._check_attention_backend_requirements(ad.AttentionBackendName(name))
    except RuntimeError as e:
        return str(e)
    except (ImportError, AttributeError, ValueError):  # another diffusers layout: fall back to the package alone
        module = {"flash": "flash_attn", "_flash_3": "flash_attn_interface"}.get(name)
        if module and importlib.util.find_spec(module) is None:
            return f"the {module} package is not installed"
    return None


def _flash_attn_version() -> tuple[int, ...]:
    try:
        from importlib.metadata import version

        return tuple(int(p) for p in version("flash-attn").split(".")[:2])
    except Exception:  # not installed, or a local build with an odd version string
        return (0,)


def resolve_attention(
    name: str, device: torch.device, dtype: torch.dtype = torch.float32, training: bool = True, compile: str = "none"
) -> str:
    """The diffusers attention backend to use. `auto`: FlashAttention 2 (flash-attn package) only on CUDA, for
    bf16/fp16 weights, when diffusers reports it usable (and, under torch.compile, flash-attn >= 2.7); else
    PyTorch SDPA (`native`), which takes any dtype and device. Explicit names are checked the same way."""
    if name not in ATTENTION_BACKENDS:
        raise UserError(f"model.attention='{name}' is not one of {', '.join(ATTENTION_BACKENDS)}")
    half = dtype in (torch.bfloat16, torch.float16)
    if name == "auto":
        usable = device.type == "cuda" and half and _diffusers_problem("flash") is None
        if usable and compile != "none" and _flash_attn_version() < FLASH_COMPILE_VERSION:
            usable = False
        return "flash" if usable else "native"
    if training and name in NO_BACKWARD:
        raise UserError(
            f"model.attention='{name}' has no backward in diffusers (forward-only op), so training "
            "cannot use it; use 'flash' (FlashAttention 2) or 'native' (SDPA)"
        )
    problem = _diffusers_problem(name)
    if problem is not None:
        raise UserError(
            f"model.attention='{name}' needs the {PACKAGES.get(name, name)} package, which diffusers "
            f"reports unusable here ({problem.rstrip('.')}); install it or use 'native' "
            "(SDPA)"
        )
    if name in HALF_ONLY and not half:
        raise UserError(
            f"model.attention='{name}' needs bfloat16 or float16 weights (model.dtype={str(dtype)[6:]}); "
            "set model.dtype=bfloat16 or use 'native' (SDPA)"
        )
    if name == "flash" and compile != "none" and _flash_attn_version() < FLASH_COMPILE_VERSION:
        raise UserError(
            "model.attention='flash' with model.compile needs flash-attn >= 2.7 (earlier versions break "
            "the fullgraph compile); upgrade it, or use model.compile=none or attention "
            "'native'"
        )
    return name


def prepare_transformer(transformer, model_cfg, device: torch.device) -> str:
    """Apply the configured switches in place; returns a one-line description for the run log."""
    from leapalign_fast.models.backbone import DTYPES

    dtype = DTYPES[model_cfg.dtype]
    backend = resolve_attention(model_cfg.attention, device, dtype, training=True, compile=model_cfg.compile)
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


# Compiled variants a whole run needs per block class (regional) or for the model (full): grad mode x
# {static first batch size, dynamic batch once a second size (grids) appears}. Above dynamo's default of 8, so
# that fullgraph=True, which turns the limit into an error, never fires inside that bound; tests count them.
RECOMPILE_LIMIT = 16


def compile_transformer(transformer, mode: str, backend: str = "inductor") -> None:
    """`regional`: each repeated block compiled with fullgraph=True (fast to compile, same speed);
    `full`: the whole forward with fullgraph=True. In place, so names and state_dict keys, LoRA and checkpoints
    are unchanged.

    Each FLUX block compile takes about a minute on an H100, so block inputs are made uniform before the
    compiled code sees them (`_uniform_block_inputs`): otherwise the first block of each kind (inputs without
    grad under LoRA, contiguous) and the rest (grad, the single blocks' non-contiguous slices) each need their
    own compile, in each grad mode and batch size.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    if mode == "regional":
        blocks = repeated_blocks(transformer)  # SD3 names none: its transformer_blocks
        if not blocks:
            raise UserError(
                f"model.compile='regional': {type(transformer).__name__} names no repeated blocks; "
                "use model.compile=full"
            )
        for block in blocks:
            compiled = torch.compile(block.forward, fullgraph=True, backend=backend)
            block.forward = functools.partial(_uniform_block_inputs, compiled)
    elif mode == "full":
        transformer.compile(fullgraph=True, backend=backend)
    else:
        raise UserError(f"model.compile='{mode}' must be none, regional or full")


def _uniform_block_inputs(forward, *args, **kwargs):
    """Call a compiled block with contiguous tensor inputs that are no views (dynamo guards a view's base, e.g.
    the first block's input, a Linear's output) and, in grad mode, all require grad: one set of guards for every
    block instance. An input without grad has no path back to a trained parameter, so making it a fresh leaf
    changes no gradient. The copies cost one memory pass over a block's input, a small part of its work."""

    def uniform(a):
        if not isinstance(a, torch.Tensor):
            return a
        if a._is_view() or not a.is_contiguous():
            a = a.clone(memory_format=torch.contiguous_format)
        if torch.is_grad_enabled() and a.is_floating_point() and not a.requires_grad:
            a = a.detach().requires_grad_(True)
        return a

    return forward(*map(uniform, args), **{k: uniform(v) for k, v in kwargs.items()})


def capture_cuda_graph(
    forward: Callable[[], torch.Tensor], warmup: int, pool=None
) -> tuple[Callable[[], None], torch.Tensor]:
    """Run `forward()` `warmup` times on a side stream (lazy inits, autotuning), then capture it in a CUDA graph
    (in the memory pool `pool` if given: `torch.cuda.graph_pool_handle()`).

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
    with torch.cuda.graph(graph, pool=pool), torch.no_grad():
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

    Every graph of one GraphedVelocity (one per input signature: training batch, evaluation batch, another
    resolution) captures into one shared memory pool, so their working sets overlap instead of adding up. That is
    safe in any replay order here: the static inputs live outside the pool, and a replay's only result is cloned
    before anything else replays, so a later replay may overwrite a graph's intermediates and static output freely.

    `capture` and `device_types` exist for tests: a CPU stand-in for `capture_cuda_graph` checks the binding.
    """

    def __init__(self, nograd_transformer, warmup: int = 2, capture=None, device_types=("cuda",)):
        # The graphs run the bare module: a DDP/FSDP wrapper's forward must not be captured.
        self.transformer, self.velocity, self.warmup = nograd_transformer, None, warmup
        self.capture, self.device_types = capture or self._capture_in_shared_pool, device_types
        self.pool = None  # made at the first capture (a CUDA memory pool handle)
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

    def _capture_in_shared_pool(self, forward: Callable[[], torch.Tensor], warmup: int):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return capture_cuda_graph(forward, warmup, pool=self.pool)

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

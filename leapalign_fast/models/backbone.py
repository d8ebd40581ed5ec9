"""The backbone interface: what the trainer, the evaluator and the benchmarks may know about a model family.

A backbone is a `Backbone` of builder callables (torchtitan's train spec), one module per family, registered by
one line in `BACKBONES`. Everything family-specific (text encoders, latent packing, the schedule, the
transformer's call with its guidance, the VAE's normalisation, LoRA names and export) lives behind it, so the
methods, the sampler and the loop are the same code for every family. Shapes the shared code sees: packed
latents (B, L, C) with (L, C) = `Geometry.tokens, Geometry.channels`, times t in [0, 1] with t = 1 noise.

Adding a family: write `models/<family>.py` ending in `BACKBONE = Backbone(...)`, add one line to `BACKBONES`.
A family module imports no other family's: what they share (directory loading, 2x2 latent packing) is in
models/common.py, the tiny tokenizers in models/text.py. Nothing outside the family modules tests a family's name
(tests/test_backbone_boundary.py): a difference between families is a field of `Backbone`.
"""

from __future__ import annotations

import copy
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from leapalign_fast.config import FLUX_LORA_TARGETS
from leapalign_fast.dtypes import DTYPES  # noqa: F401  (re-exported: the one dtype map lives in a leaf both sides use)
from leapalign_fast.errors import UserError
from leapalign_fast.hub import is_hub, resolve

# family -> module holding its `BACKBONE`; imported on first use, so a run imports only its own family's classes.
BACKBONES = {
    "flux": "leapalign_fast.models.flux",  # FLUX.1-dev/schnell: FluxPipeline
    "sd3": "leapalign_fast.models.sd3",  # SD3.5-Medium/Large: StableDiffusion3Pipeline
    "flux2": "leapalign_fast.models.flux2",  # FLUX.2-Klein (base: true CFG): Flux2KleinPipeline
    "qwenimage": "leapalign_fast.models.qwenimage",  # Qwen-Image: QwenImagePipeline
    "wan": "leapalign_fast.models.wan",  # Wan 2.1 T2V, Wan 2.2 TI2V (text-to-video): WanPipeline
    "zimage": "leapalign_fast.models.zimage",  # Z-Image-Turbo and Z-Image: ZImagePipeline
}


class ConditionedVelocity:
    """Base of every backbone's velocity: the tensors named in `CONDITIONING` are all the forward reads besides
    x, t and the weights, so a CUDA graph can own them as static buffers (`models.fast.GraphedVelocity`)."""

    CONDITIONING: tuple[str, ...] = ()

    def conditioning(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in self.CONDITIONING}

    def with_conditioning(self, conditioning: dict[str, torch.Tensor | None]):
        """The same velocity (weights, guidance, switches) reading exactly the given tensors."""
        new = copy.copy(self)
        for name, value in conditioning.items():
            setattr(new, name, value)
        return new


@dataclass(frozen=True)
class Geometry:
    """The latent layout of one resolution: VAE latents (C_vae, frames, h, w), packed to (tokens, channels); an
    image is one frame."""

    h: int  # VAE latent height
    w: int  # VAE latent width
    tokens: int  # L of the packed (B, L, C) latents the transformer and the methods see (all frames)
    channels: int  # C of the packed latents
    frames: int = 1  # latent frames (a video backbone's; images: 1)

    def noise_shape(self, batch: int) -> tuple[int, int, int]:
        return (batch, self.tokens, self.channels)

    @classmethod
    def of_patches(cls, size: int | tuple[int, int], vae_factor: int, latent_channels: int) -> "Geometry":
        """An image's VAE latents (downsampled by `vae_factor`) packed as 2x2 patches: (h/2)(w/2) tokens of
        4 x latent_channels. `size` is (height, width) in pixels, or one int for a square; a side the packing
        cannot take is one UserError line naming a valid one."""
        height, width = (size, size) if isinstance(size, int) else size
        step = 2 * vae_factor
        for name, side in (("height", height), ("width", width)):
            if side % step:
                what = f"resolution {side}" if height == width else f"image {name} {side}"
                raise UserError(
                    f"{what} is not divisible by {step} (VAE factor {vae_factor} x 2x2 latent packing); use a "
                    f"multiple of {step}, e.g. {max(step, side // step * step)}"
                )
        h, w = height // vae_factor, width // vae_factor
        return cls(h, w, (h // 2) * (w // 2), 4 * latent_channels)

    def pixels(self, vae_factor: int) -> tuple[int, int]:
        """(height, width) of the image these latents decode to."""
        return self.h * vae_factor, self.w * vae_factor


@dataclass(frozen=True)
class Backbone:
    """One model family as builder callables. `components` below is the family's own dataclass with (at least)
    `transformer`, `vae` and `text` (None once prompts are cached and the encoders freed)."""

    name: str
    pipeline: str  # diffusers pipeline `_class_name` of model_index.json (directory detection, LoRA export)
    build_tiny: Callable[[Any, int], Any]  # (model.tiny config, seed) -> components (random real classes)
    # (path, dtype, need_text, max_sequence_length, empty_transformer=False) -> components; UserError lists gaps;
    # empty_transformer: the transformer on the meta device, its weights unread (FSDP loads its shards itself)
    load: Callable[..., Any]
    encode_prompts: Callable[[Any, list[str]], dict[str, torch.Tensor]]  # (text, prompts) -> named (P, ...) CPU
    conditioning: tuple[str, ...]  # the cached tensors `velocity` reads (a cache may hold more, e.g. lengths)
    geometry: Callable[
        [Any, Any], Geometry
    ]  # (components, size: int or (height, width)) -> Geometry; UserError if not divisible
    # (components, num_steps, geometry, device=None) -> (N + 1,) f32 sigmas, 1 ... 0: the components' scheduler config
    # (the model directory's) set as the family's pipeline sets it (models/common.pipeline_schedule)
    schedule: Callable[..., torch.Tensor]
    # (transformer, conditioning dict, geometry, guidance, uncond_grad=True) -> v(x, t), graphable (see FluxVelocity);
    # guidance as the pipeline applies it to this transformer (none without a guidance embedding, no CFG if distilled)
    velocity: Callable[..., Any]
    # (vae, packed x, geometry) -> images (B, 3, H, W) in [0, 1]; a video family's: frames (B, T, 3, H, W)
    decode: Callable[[Any, torch.Tensor, Geometry], torch.Tensor]
    lora_targets: tuple[str, ...]  # peft target_modules of the transformer
    decoder_width: Callable[[Any], int]  # (vae) -> its decoder's widest channel count (the memory preflight's bound)
    # (vae, images (B, 3, H, W) in [0, 1]) -> packed latents, the inverse of `decode` (toy benchmarks); optional
    encode_images: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    # (components, conditioning dict, noise (B, L, C), geometry, num_steps, guidance) -> packed x0 (B, L, C) sampled
    # by the family's diffusers pipeline (text encoders absent): the reference of bench/sampler.py
    pipeline_sample: Callable[..., torch.Tensor] | None = None
    # A video family: `geometry` takes a third argument, `num_frames`, and `decode` returns (B, T, 3, H, W)
    video: bool = False
    # The prompt cache's model-id prefix (`cache_prefix`); None: "<name>:". FLUX's is "": its keys predate this
    # interface, so its existing caches stay valid.
    prompt_cache_prefix: str | None = None
    # The dtype of the sampled latents where the pipeline fixes it (ZImagePipeline keeps float32 latents whatever its
    # transformer's dtype); None: the model's dtype (`model.dtype`). See `noise_dtype`.
    latent_dtype: torch.dtype | None = None
    # (transformer config) -> (hidden width, blocks a token passes) for the memory preflight; None: diffusers' usual
    # names, num_attention_heads x attention_head_dim and num_layers + num_single_layers
    transformer_size: Callable[[Any], tuple[int, int]] | None = None
    # False: the velocity's forward has shapes that follow the prompts (Z-Image: each prompt at its own length), so no
    # CUDA graph can replay it; `model.cuda_graph = true` is refused before anything loads
    graphable: bool = True
    # LoRA export: models/lora_export.py writes through `<pipeline>.save_lora_weights`, which the pipeline loads.

    @property
    def cache_prefix(self) -> str:
        """What the prompt cache puts before the model's source in its key, so families never share a cache."""
        return f"{self.name}:" if self.prompt_cache_prefix is None else self.prompt_cache_prefix

    def layout(self, components, size, num_frames: int = 1) -> Geometry:
        """The geometry of `size` (pixels) and `num_frames` (the config's; an image family takes only 1)."""
        self.check_frames(num_frames)
        return self.geometry(components, size, num_frames) if self.video else self.geometry(components, size)

    def check_frames(self, num_frames: int) -> None:
        """A frame count an image family cannot take is one UserError line (before any model is loaded)."""
        if num_frames != 1 and not self.video:
            raise UserError(
                f"num_frames={num_frames}: model.family {self.name} makes images; set num_frames = 1 or use a video "
                f"family ({', '.join(n for n in BACKBONES if get_backbone(n).video)})"
            )

    def noise_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the sampler's noise and states have for a model stored in `model_dtype`."""
        return self.latent_dtype or model_dtype

    def resolve_lora_targets(self, configured) -> list[str]:
        """`lora.target_modules` on this backbone: as configured, except that the config's default (FLUX.1's
        names, `config.FLUX_LORA_TARGETS`) means this backbone's own `lora_targets`."""
        targets = list(configured)
        return list(self.lora_targets) if targets == FLUX_LORA_TARGETS else targets


def family_of(source: str, family: str | None, revision: str | None = None) -> str:
    """`model.family` if set, else read from `<source>/model_index.json`'s `_class_name`, else FLUX. A hub id
    fetches that one file (`hub.resolve`)."""
    if family:
        return family
    root = resolve(source, revision, ["model_index.json"]) if is_hub(source) else Path(source)
    index = root / "model_index.json"
    if source != "tiny" and index.is_file():
        try:
            cls = json.loads(index.read_text()).get("_class_name", "")
        except (OSError, json.JSONDecodeError):
            cls = ""
        for name in BACKBONES:
            if get_backbone(name).pipeline == cls:
                return name
        if cls:
            raise UserError(
                f"model.source {source}: model_index.json names {cls}, which no backbone loads "
                f"(known: {', '.join(BACKBONES)}); set model.family to one of them"
            )
    return "flux"


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"model.family '{name}' is not a backbone; choose one of {', '.join(BACKBONES)}")
    return importlib.import_module(BACKBONES[name]).BACKBONE


def backbone_for(model_cfg) -> Backbone:
    """The backbone of a `[model]` config."""
    return get_backbone(
        family_of(model_cfg.source, getattr(model_cfg, "family", ""), getattr(model_cfg, "revision", "") or None)
    )

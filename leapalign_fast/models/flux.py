"""FLUX components (diffusers' FluxTransformer2DModel + AutoencoderKL, CLIP + T5, the scheduler config), image ids,
velocity.

The FLUX.1 backbone (`BACKBONE`, at the end). One code path for every size: `build_tiny_flux` makes random-init
components of the real classes (FLUX.1-dev's scheduler config), `load_flux` reads a local diffusers-format directory
(FLUX.1-dev, FLUX.1-schnell, or a tiny one written by `save_flux`). As FluxPipeline: the schedule is the directory's
scheduler config (dev: dynamic shift from the token count; schnell: static shift 1.0), and guidance goes to the
transformer only where it has a guidance embedding (dev; schnell has none: guidance is ignored, logged once).
Shapes: packed latents (B, L, 4C) with L = (H/2)(W/2) tokens; VAE latents (B, C=16, H, W). The packing and the
directory loading every family shares live in models/common.py (`pack_latents`, `unpack_latents` re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from leapalign_fast.config import FLUX_LORA_TARGETS, TinyFluxConfig  # noqa: F401  (sizes live with the config)
from leapalign_fast.errors import UserError
from leapalign_fast.flow import REDUCED, calculate_shift
from leapalign_fast.models.backbone import DTYPES, Backbone, ConditionedVelocity, Geometry  # noqa: F401  (DTYPES re-exported)
from leapalign_fast.models.common import (
    load_denoiser,
    load_part,
    log_once,
    missing_parts,
    pack_latents,
    pipeline_schedule,
    tiny_flux_vae,
    unpack_latents,
    unwrap,
)
from leapalign_fast.models.text import TextStack, build_tiny_text_stack, encode_prompts


def dev_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config (its scheduler_config.json): the dynamic shift, 0.5 at 256 tokens to 1.15 at
    4096. The tiny build's; a model directory brings its own."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


@dataclass
class FluxComponents:
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text: TextStack | None  # None once prompts are cached and the encoders are freed
    scheduler: FlowMatchEulerDiscreteScheduler = field(default_factory=dev_scheduler)  # its config: the schedule

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_hw(self, size: int | tuple[int, int]) -> tuple[int, int]:
        """VAE latent height/width of an image (one int: a square); must be even to pack 2x2 patches."""
        geom = Geometry.of_patches(size, self.vae_scale_factor, self.vae.config.latent_channels)
        return geom.h, geom.w


def build_tiny_flux(cfg: TinyFluxConfig, seed: int) -> FluxComponents:
    """Random-init tiny FLUX: transformer, 16-channel VAE with 8x downsampling, CLIP + T5 encoders."""
    if cfg.head_dim % 4:
        raise UserError(f"model.tiny.head_dim={cfg.head_dim} must be divisible by 4 (rope axes split it)")
    q = cfg.head_dim // 4
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=cfg.layers,
        num_single_layers=cfg.single_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_dim,
        pooled_projection_dim=cfg.text_dim,
        guidance_embeds=True,
        axes_dims_rope=(q, q, 2 * q),
    )
    vae = tiny_flux_vae(cfg.vae_channels)
    text = build_tiny_text_stack(cfg.text_dim, cfg.max_sequence_length, seed + 1)
    return FluxComponents(transformer, vae.eval(), text, dev_scheduler())


# What a diffusers-format FLUX directory must hold; a weight entry is satisfied by any listed name.
_REQUIRED = {
    "transformer": [
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    ],
    "vae": ["config.json", ("diffusion_pytorch_model.safetensors",)],
    "scheduler": ["scheduler_config.json"],
    "text_encoder": ["config.json", ("model.safetensors", "model.safetensors.index.json")],
    "text_encoder_2": ["config.json", ("model.safetensors", "model.safetensors.index.json")],
    "tokenizer": [("tokenizer.json", "vocab.json")],
    "tokenizer_2": [("tokenizer.json", "spiece.model")],
}


def missing_files(root: Path, need_text: bool = True) -> list[str]:
    """Paths (relative to root) that a FLUX directory lacks; alternatives are joined with ' or '."""
    return missing_parts(root, _REQUIRED, need_text)


def load_flux(
    path: str | Path,
    dtype: torch.dtype,
    need_text: bool = True,
    max_sequence_length: int = 512,
    empty_transformer: bool = False,
) -> FluxComponents:
    """Load FLUX from a local diffusers-format directory (no hub access); `empty_transformer`: see load_denoiser."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    root = Path(path)
    if not root.is_dir():
        raise UserError(
            f"model.source: {root} is not a directory; give a local diffusers-format FLUX directory "
            "(e.g. a snapshot of black-forest-labs/FLUX.1-dev) or 'tiny'"
        )
    missing = missing_files(root, need_text)
    if missing:
        raise UserError(f"model.source {root} is incomplete; missing: {', '.join(missing)}")

    def load(what: str, fn):
        return load_part(root, what, fn)

    transformer, vae, scheduler = load_denoiser(
        root, FluxTransformer2DModel, AutoencoderKL, dtype, empty=empty_transformer
    )
    text = None
    if need_text:
        tkw = dict(dtype=dtype, local_files_only=True)
        text = TextStack(
            load("tokenizer", lambda: CLIPTokenizer.from_pretrained(root / "tokenizer")),
            load("text_encoder", lambda: CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **tkw)).eval(),
            load("tokenizer_2", lambda: T5Tokenizer.from_pretrained(root / "tokenizer_2")),
            load(
                "text_encoder_2", lambda: T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", **tkw)
            ).eval(),
            max_sequence_length,
        )
    return FluxComponents(transformer, vae, text, scheduler)


def save_flux(components: FluxComponents, path: str | Path) -> None:
    """Write components as a diffusers-format directory that `load_flux` and FluxPipeline read."""
    root = Path(path)
    components.transformer.save_pretrained(root / "transformer")
    components.vae.save_pretrained(root / "vae")
    components.scheduler.save_pretrained(root / "scheduler")
    import diffusers

    from leapalign_fast.io import write_json_atomic

    write_json_atomic(
        root / "model_index.json",
        {  # what FluxPipeline.from_pretrained reads first
            "_class_name": "FluxPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        },
    )
    if components.text is not None:
        t = components.text
        t.clip.save_pretrained(root / "text_encoder")
        t.t5.save_pretrained(root / "text_encoder_2")
        t.clip_tokenizer.save_pretrained(root / "tokenizer")
        t.t5_tokenizer.save_pretrained(root / "tokenizer_2")


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H/2 * W/2, 3) positional ids (0, row, col) as FluxPipeline builds them."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxVelocity(ConditionedVelocity):
    """`v(x, t)` of a FLUX transformer for one batch of conditioning: the `velocity` of `flow`.

    t is (B,) in [0, 1]; the transformer scales timestep and guidance by 1000 itself. In bf16/fp16 the time is
    FluxPipeline's `(1000 t).to(dtype) / 1000`; in float32 it passes as it is, so float32 runs stay what they were
    (the pipeline's `(1000 t) / 1000` is 1 ulp off t for about 3% of times). `guidance` None: a transformer
    without a guidance embedding (FLUX.1-schnell). Every tensor the forward reads besides x, t and the weights is
    one of `CONDITIONING`, so a CUDA graph can hold all of them in static buffers (`models.fast.GraphedVelocity`).
    """

    CONDITIONING = ("t5", "pooled", "img_ids", "txt_ids", "guidance")

    def __init__(
        self,
        transformer,
        t5: torch.Tensor,
        pooled: torch.Tensor,
        img_ids: torch.Tensor,
        guidance: float | torch.Tensor | None,
        txt_ids: torch.Tensor | None = None,
    ):
        self.transformer = transformer
        self.t5 = t5  # (B, S, D)
        self.pooled = pooled  # (B, Dp)
        self.img_ids = img_ids  # (L, 3)
        if txt_ids is None:
            txt_ids = torch.zeros(t5.shape[1], 3, device=t5.device, dtype=img_ids.dtype)
        self.txt_ids = txt_ids  # (S, 3)
        if guidance is not None and not isinstance(guidance, torch.Tensor):
            guidance = torch.full((t5.shape[0],), float(guidance), device=t5.device)
        self.guidance = guidance  # (B,) or None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:
            # Both trained forwards then present the same autograd state to torch.compile (LeapAlign's x_k is
            # detached, its u_j carries grad): one compiled graph per block, not two. Grad to this leaf is dropped.
            x = x.detach().requires_grad_(True)
        ts = (t.float() * 1000).to(x.dtype) / 1000 if x.dtype in REDUCED else t.to(x.dtype)
        return self.transformer(
            hidden_states=x.contiguous(),
            timestep=ts,
            guidance=self.guidance,
            pooled_projections=self.pooled.to(x.dtype),
            encoder_hidden_states=self.t5.to(x.dtype),
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]


def encode_images(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> packed FLUX-normalised latents (B, L, 64): the VAE posterior mode, the
    inverse of `decode_latents`."""
    z = vae.encode(images.to(vae.dtype) * 2 - 1).latent_dist.mode()
    return pack_latents((z - vae.config.shift_factor) * vae.config.scaling_factor)


def decode_latents(vae: AutoencoderKL, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Packed latents (B, L, 64) -> images (B, 3, 8h, 8w) float in [0, 1], differentiable."""
    z = unpack_latents(x, h, w)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (image.float() * 0.5 + 0.5).clamp(0.0, 1.0)


# The backbone interface (models/backbone.py): what train, evaluate and the benchmarks call.


def geometry(components: FluxComponents, resolution: int | tuple[int, int]) -> Geometry:
    """2x2 patches of the VAE latents: L = (h/2)(w/2) tokens of 4 x 16 = 64 channels."""
    return Geometry.of_patches(resolution, components.vae_scale_factor, components.vae.config.latent_channels)


def schedule(components: FluxComponents, num_steps: int, geom: Geometry, device=None) -> torch.Tensor:
    """FluxPipeline's schedule from the components' scheduler config: linspace(1, 1/N) sigmas, shifted dynamically
    by `mu` of the token count (FLUX.1-dev) or statically by the config's `shift` (FLUX.1-schnell: 1.0), 0 appended."""
    c = components.scheduler.config
    mu = calculate_shift(
        geom.tokens,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )
    return pipeline_schedule(c, num_steps, mu=mu, device=device)


def has_guidance_embedding(transformer) -> bool:
    """FluxPipeline's test: the transformer's config has `guidance_embeds` (FLUX.1-dev yes, schnell no)."""
    return bool(unwrap(transformer).config.get("guidance_embeds", False))


def velocity(
    transformer, cond: dict[str, torch.Tensor], geom: Geometry, guidance: float | None, uncond_grad: bool = True
) -> FluxVelocity:
    """The distilled-guidance velocity for one batch of cached conditioning (`t5`, `pooled`), on their device:
    one forward per call (no unconditional branch, so `uncond_grad` has nothing to switch). A transformer without
    a guidance embedding (schnell) gets no guidance, as in FluxPipeline; a configured one is ignored, logged once."""
    if guidance is not None and not has_guidance_embedding(transformer):
        log_once(
            f"guidance {guidance} is ignored: the FLUX transformer has no guidance embedding (guidance_embeds = "
            "false, e.g. FLUX.1-schnell), as in FluxPipeline"
        )
        guidance = None
    t5 = cond["t5"]
    return FluxVelocity(transformer, t5, cond["pooled"], latent_image_ids(geom.h, geom.w, t5.device), guidance)


def decode(vae: AutoencoderKL, x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    return decode_latents(vae, x, geom.h, geom.w)


def prompt_tensors(text: TextStack, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The prompt cache's tensors: T5 states, CLIP pooled, T5 lengths (as FluxPipeline.encode_prompt)."""
    e = encode_prompts(text, prompts)
    return {"t5": e.t5, "pooled": e.pooled, "t5_lengths": e.lengths}


@torch.no_grad()
def pipeline_sample(
    components: FluxComponents,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    geom: Geometry,
    num_steps: int,
    guidance: float,
) -> torch.Tensor:
    """FluxPipeline's packed latents from the same noise and cached embeddings (the components' scheduler config)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config),
        vae=components.vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=components.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    height, width = geom.pixels(components.vae_scale_factor)
    return pipe(
        prompt_embeds=cond["t5"],
        pooled_prompt_embeds=cond["pooled"],
        latents=noise,
        height=height,
        width=width,
        num_inference_steps=num_steps,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
    )[0]


def decoder_width(vae: AutoencoderKL) -> int:
    return max(vae.config.block_out_channels)


def _build_tiny(tiny_cfg, seed: int) -> FluxComponents:
    return build_tiny_flux(tiny_cfg, seed)


BACKBONE = Backbone(
    name="flux",
    pipeline="FluxPipeline",
    build_tiny=_build_tiny,
    load=load_flux,
    encode_prompts=prompt_tensors,
    conditioning=("t5", "pooled"),
    geometry=geometry,
    schedule=schedule,
    velocity=velocity,
    decode=decode,
    lora_targets=tuple(FLUX_LORA_TARGETS),
    decoder_width=decoder_width,
    encode_images=encode_images,
    pipeline_sample=pipeline_sample,
    prompt_cache_prefix="",  # FLUX's cache keys predate the backbone interface: unprefixed, existing caches stay valid
)

"""The Stable Diffusion 3.5 backbone (SD3.5-Medium): SD3Transformer2DModel, AutoencoderKL with SD3's scaling and
shift factors, CLIP-L + CLIP-G + T5 text encoders as `StableDiffusion3Pipeline.encode_prompt` uses them, the
scheduler's static shift, and true classifier-free guidance with the (empty) negative prompt.

Latents are packed 2x2 like FLUX's (models/common.py), (B, (h/2)(w/2), 64), so the shared code sees the transformer's
token count;
the velocity unpacks to the (B, 16, h, w) the transformer patchifies itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from leapalign_fast.models.backbone import Backbone, ConditionedVelocity, Geometry
from leapalign_fast.models.common import (
    load_denoiser,
    load_part,
    model_dir,
    pack_latents,
    pipeline_schedule,
    tiny_flux_vae,
    unpack_latents,
)
from leapalign_fast.models.text import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer

LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
SHIFT = 3.0  # SD3.5-Medium's scheduler_config.json


@dataclass
class SD3Text:
    tokenizer: CLIPTokenizer  # CLIP-L
    text_encoder: CLIPTextModelWithProjection
    tokenizer_2: CLIPTokenizer  # CLIP-G
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer_3: object  # T5
    text_encoder_3: T5EncoderModel
    max_sequence_length: int


@dataclass
class SD3Components:
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    text: SD3Text | None
    scheduler: FlowMatchEulerDiscreteScheduler


def build_tiny_sd3(tiny_cfg, seed: int) -> SD3Components:
    """Random-init tiny SD3.5 (dual-attention first block, RMS qk-norm as SD3.5-M), VAE, CLIP-L/G and T5.
    Sizes from `model.tiny`: heads x head_dim, text_dim (T5 width; each CLIP is half of it)."""
    torch.manual_seed(seed)
    inner = tiny_cfg.heads * tiny_cfg.head_dim
    clip_dim = tiny_cfg.text_dim // 2
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=tiny_cfg.layers + 1,
        attention_head_dim=tiny_cfg.head_dim,
        num_attention_heads=tiny_cfg.heads,
        joint_attention_dim=tiny_cfg.text_dim,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * clip_dim,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    c = tiny_cfg.vae_channels
    vae = tiny_flux_vae(c, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's own latent scaling and shift
    torch.manual_seed(seed + 1)
    clip_tok = build_tiny_clip_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=clip_dim,
                intermediate_size=2 * clip_dim,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=clip_dim,
                hidden_act="gelu",
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        ).eval()

    t5_tok = build_tiny_t5_tokenizer()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=tiny_cfg.text_dim,
            d_kv=tiny_cfg.text_dim // 4,
            d_ff=2 * tiny_cfg.text_dim,
            num_layers=1,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
    ).eval()
    text = SD3Text(clip_tok, clip(), build_tiny_clip_tokenizer(), clip(), t5_tok, t5, tiny_cfg.max_sequence_length)
    return SD3Components(transformer, vae.eval(), text, FlowMatchEulerDiscreteScheduler(shift=SHIFT))


_REQUIRED = {
    "transformer": [
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    ],
    "vae": ["config.json", ("diffusion_pytorch_model.safetensors",)],
    "scheduler": ["scheduler_config.json"],
    "text_encoder": ["config.json", ("model.safetensors",)],
    "text_encoder_2": ["config.json", ("model.safetensors",)],
    "text_encoder_3": ["config.json", ("model.safetensors", "model.safetensors.index.json")],
    "tokenizer": [("tokenizer.json", "vocab.json")],
    "tokenizer_2": [("tokenizer.json", "vocab.json")],
    "tokenizer_3": [("tokenizer.json", "spiece.model")],
}


def load_sd3(
    path, dtype: torch.dtype, need_text: bool = True, max_sequence_length: int = 256, empty_transformer: bool = False
) -> SD3Components:
    """SD3.5 from a local diffusers-format directory (a snapshot of stabilityai/stable-diffusion-3.5-medium)."""
    from transformers import AutoTokenizer

    root = model_dir(path, _REQUIRED, need_text, "SD3.5")
    transformer, vae, scheduler = load_denoiser(
        root, SD3Transformer2DModel, AutoencoderKL, dtype, empty=empty_transformer
    )
    text = None
    if need_text:
        tkw = dict(dtype=dtype, local_files_only=True)
        enc = lambda cls, sub: load_part(root, sub, lambda: cls.from_pretrained(root, subfolder=sub, **tkw)).eval()  # noqa: E731
        tok = lambda sub: load_part(root, sub, lambda: AutoTokenizer.from_pretrained(root / sub))  # noqa: E731
        text = SD3Text(
            tok("tokenizer"),
            enc(CLIPTextModelWithProjection, "text_encoder"),
            tok("tokenizer_2"),
            enc(CLIPTextModelWithProjection, "text_encoder_2"),
            tok("tokenizer_3"),
            enc(T5EncoderModel, "text_encoder_3"),
            max_sequence_length,
        )
    return SD3Components(transformer, vae, text, scheduler)


def _clip(tokenizer, encoder, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    out = encoder(ids.to(device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]  # penultimate states, projected pooled


@torch.no_grad()
def encode(text: SD3Text, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (P, 77 + S, D_t5), pooled (P, D_L + D_G)) as `StableDiffusion3Pipeline.encode_prompt`."""
    device = next(text.text_encoder.parameters()).device
    dtype = text.text_encoder.dtype
    e1, p1 = _clip(text.tokenizer, text.text_encoder, prompts, device)
    e2, p2 = _clip(text.tokenizer_2, text.text_encoder_2, prompts, device)
    clip = torch.cat([e1.to(dtype), e2.to(dtype)], dim=-1)
    ids = text.tokenizer_3(
        prompts,
        padding="max_length",
        max_length=text.max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    t5 = text.text_encoder_3(ids.to(device))[0].to(text.text_encoder_3.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([p1, p2], dim=-1)


def prompt_tensors(text: SD3Text, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The cache's tensors: each prompt's embeddings and the negative prompt's ("", the pipeline's default) per
    prompt, so a batch reads its rows like any other conditioning (twice the cache; the rows are equal)."""
    embeds, pooled = encode(text, prompts)
    neg, neg_pooled = encode(text, [""] * len(prompts))  # batched as the pipeline does (same float round-off)
    return {"embeds": embeds.cpu(), "pooled": pooled.cpu(), "neg_embeds": neg.cpu(), "neg_pooled": neg_pooled.cpu()}


def geometry(components: SD3Components, resolution: int | tuple[int, int]) -> Geometry:
    return Geometry.of_patches(
        resolution, 2 ** (len(components.vae.config.block_out_channels) - 1), components.vae.config.latent_channels
    )


def schedule(components: SD3Components, num_steps: int, geom: Geometry, device=None) -> torch.Tensor:
    """The pipeline's schedule: N steps of its scheduler's config, 0 appended: the static shift (SD3.5-M: 3.0), or
    where the config shifts dynamically, mu of the transformer's patch count (the pipeline's defaults, max 1.16)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    c = components.scheduler.config
    mu = None
    if c.get("use_dynamic_shifting"):
        patch = components.transformer.config.patch_size
        mu = calculate_shift(
            (geom.h // patch) * (geom.w // patch),
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.16),
        )
    return pipeline_schedule(c, num_steps, mu=mu, linspace=False, device=device)


class SD3Velocity(ConditionedVelocity):
    """`v(x, t)` with true CFG: `v_neg + g (v_pos - v_neg)` from one batched forward over [neg, pos] (as the
    pipeline). With `uncond_grad=False`, a grad-enabled call runs the negative branch without grad (one forward's
    activations less; the gradient then flows through `g v_pos` only). t is (B,) in [0, 1]; SD3 takes t * 1000."""

    CONDITIONING = ("embeds", "pooled", "neg_embeds", "neg_pooled")

    def __init__(
        self,
        transformer,
        embeds,
        pooled,
        neg_embeds,
        neg_pooled,
        h: int,
        w: int,
        guidance: float,
        uncond_grad: bool = True,
    ):
        self.transformer, self.h, self.w = transformer, h, w
        self.embeds, self.pooled, self.neg_embeds, self.neg_pooled = embeds, pooled, neg_embeds, neg_pooled
        self.guidance, self.uncond_grad = float(guidance), uncond_grad

    def _forward(self, z, t, embeds, pooled):
        return self.transformer(
            hidden_states=z,
            timestep=t,
            encoder_hidden_states=embeds.to(z.dtype),
            pooled_projections=pooled.to(z.dtype),
            return_dict=False,
        )[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # one autograd state for torch.compile (see FluxVelocity)
        z = unpack_latents(x.contiguous(), self.h, self.w)
        ts = t.float() * 1000
        if self.guidance <= 1.0:
            return pack_latents(self._forward(z, ts, self.embeds, self.pooled))
        if self.uncond_grad or not torch.is_grad_enabled():
            out = self._forward(
                torch.cat([z, z]),
                torch.cat([ts, ts]),
                torch.cat([self.neg_embeds, self.embeds]),
                torch.cat([self.neg_pooled, self.pooled]),
            )
            v_neg, v_pos = out.chunk(2)
        else:
            with torch.no_grad():
                v_neg = self._forward(z, ts, self.neg_embeds, self.neg_pooled)
            v_pos = self._forward(z, ts, self.embeds, self.pooled)
        return pack_latents(v_neg + self.guidance * (v_pos - v_neg))


def velocity(
    transformer, cond: dict[str, torch.Tensor], geom: Geometry, guidance: float | None, uncond_grad: bool = True
) -> SD3Velocity:
    return SD3Velocity(
        transformer, **cond, h=geom.h, w=geom.w, guidance=1.0 if guidance is None else guidance, uncond_grad=uncond_grad
    )


def decode(vae: AutoencoderKL, x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Packed latents -> images in [0, 1]: SD3's `z / scaling_factor + shift_factor`, differentiable."""
    z = unpack_latents(x, geom.h, geom.w) / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (image.float() * 0.5 + 0.5).clamp(0.0, 1.0)


def decoder_width(vae: AutoencoderKL) -> int:
    return max(vae.config.block_out_channels)


@torch.no_grad()
def pipeline_sample(
    components: SD3Components,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    geom: Geometry,
    num_steps: int,
    guidance: float,
) -> torch.Tensor:
    """StableDiffusion3Pipeline's latents (B, 16, h, w), packed, from the same noise and cached embeddings."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=components.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config),
        vae=components.vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    height, width = geom.pixels(2 ** (len(components.vae.config.block_out_channels) - 1))
    z = pipe(
        prompt_embeds=cond["embeds"],
        pooled_prompt_embeds=cond["pooled"],
        negative_prompt_embeds=cond["neg_embeds"],
        negative_pooled_prompt_embeds=cond["neg_pooled"],
        latents=unpack_latents(noise, geom.h, geom.w),
        height=height,
        width=width,
        num_inference_steps=num_steps,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
    )[0]
    return pack_latents(z)


BACKBONE = Backbone(
    name="sd3",
    pipeline="StableDiffusion3Pipeline",
    build_tiny=build_tiny_sd3,
    load=load_sd3,
    encode_prompts=prompt_tensors,
    conditioning=SD3Velocity.CONDITIONING,
    geometry=geometry,
    schedule=schedule,
    velocity=velocity,
    decode=decode,
    lora_targets=LORA_TARGETS,
    decoder_width=decoder_width,
    pipeline_sample=pipeline_sample,
)

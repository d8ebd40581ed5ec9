"""The Wan backbone (text-to-video): WanTransformer3DModel, AutoencoderKLWan (Wan 2.1's 8x VAE, Wan 2.2's 16x
patchified one), the UMT5 text encoder as `WanPipeline` uses it (prompt_clean, padded to max_sequence_length, the
tokens past each prompt zeroed), and true CFG with the pipeline's default empty negative prompt.

Geometry has a frame axis: `num_frames` video frames are (num_frames - 1) / 4 + 1 latent frames of (C, h, w)
latents; packed latents are (B, frames x (h/2)(w/2), 4 C), the transformer's own (1, 2, 2) patches in its token
order (frame, row, column). The decode returns (B, num_frames, 3, H, W) in [0, 1]: the rewards score it per frame
(rewards/video.py).

Schedule: the Euler flow-match trajectory of FlowMatchEulerDiscreteScheduler (the scheduler class WanPipeline
declares) with the model's `flow_shift` (Wan's scheduler_config.json is a UniPCMultistepScheduler's; its
`flow_shift` is the shift, 3.0 for 480p Wan 2.1). The published Wan samplers step with UniPC (a second-order
multistep solver); every method here differentiates Euler steps, so training and evaluation sample with the Euler
steps of the same shifted schedule, exactly as WanPipeline does with that scheduler (tests/test_wan.py).
Wan 2.2 TI2V-5B (`expand_timesteps` in model_index.json, the pipeline's config) gets its timestep per token, as
the pipeline gives it; the two-transformer Wan 2.2 A14B (`boundary_ratio`) is not supported.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from leapalign_fast.errors import UserError
from leapalign_fast.models.backbone import Backbone, ConditionedVelocity, Geometry
from leapalign_fast.models.common import (
    SINGLE_ENCODER_PARTS,
    load_denoiser,
    load_part,
    load_single_encoder,
    model_dir,
    pipeline_schedule,
    unwrap,
)
from leapalign_fast.models.text import build_tiny_t5_tokenizer
from leapalign_fast.recompute import DECODE_RECOMPUTED, RECOMPUTES_ITSELF

# Self-attention, cross-attention and the feed-forward of every block (the published Wan LoRAs' q, k, v, o, ffn).
LORA_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)
PARTS = {**SINGLE_ENCODER_PARTS, "tokenizer": [("tokenizer.json", "spiece.model")]}  # UMT5's tokenizer
# WanPipeline's `expand_timesteps` (Wan 2.2 TI2V), marked on the bare transformer: the velocity is built from it.
_EXPAND = "_leapalign_wan_expand_timesteps"


def expands_timesteps(transformer) -> bool:
    return bool(getattr(unwrap(transformer), _EXPAND, False))


@dataclass
class WanText:
    tokenizer: object  # T5TokenizerFast (UMT5's)
    text_encoder: UMT5EncoderModel
    max_sequence_length: int


@dataclass
class WanComponents:
    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan
    text: WanText | None
    scheduler: FlowMatchEulerDiscreteScheduler  # Euler flow matching with the model's shift

    def __post_init__(self):
        setattr(self.vae, RECOMPUTES_ITSELF, True)  # `decode` recomputes per latent frame under checkpoint_decode

    @property
    def expand_timesteps(self) -> bool:
        return expands_timesteps(self.transformer)

    @expand_timesteps.setter
    def expand_timesteps(self, value: bool) -> None:
        setattr(unwrap(self.transformer), _EXPAND, bool(value))


def euler_scheduler(config: dict) -> FlowMatchEulerDiscreteScheduler:
    """The flow-match Euler scheduler of a Wan scheduler config: a UniPCMultistepScheduler's `flow_shift` (Wan's
    own) or a FlowMatchEulerDiscreteScheduler config as it is."""
    if "flow_shift" in config:
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.get("num_train_timesteps", 1000), shift=float(config["flow_shift"] or 1.0)
        )
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def build_tiny_wan(tiny_cfg, seed: int) -> WanComponents:
    """Random-init tiny Wan 2.1: transformer (layers + single_layers blocks), an 8x AutoencoderKLWan with 4x
    temporal compression, a 2-layer UMT5 encoder; the 480p shift 3.0."""
    if tiny_cfg.head_dim % 2:
        raise UserError(f"model.tiny.head_dim={tiny_cfg.head_dim} must be even (Wan's rope splits it in 3 axes)")
    torch.manual_seed(seed)
    inner = tiny_cfg.heads * tiny_cfg.head_dim
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=tiny_cfg.heads,
        attention_head_dim=tiny_cfg.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=tiny_cfg.text_dim,
        freq_dim=32,
        ffn_dim=2 * inner,
        num_layers=tiny_cfg.layers + tiny_cfg.single_layers,
        rope_max_seq_len=256,
    )
    vae = AutoencoderKLWan(
        base_dim=max(4, tiny_cfg.vae_channels // 2),
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    torch.manual_seed(seed + 1)
    tok = build_tiny_t5_tokenizer()
    d = tiny_cfg.text_dim
    encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tok),
            d_model=d,
            d_kv=d // 2,
            d_ff=2 * d,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=tok.pad_token_id,
        )
    ).eval()
    text = WanText(tok, encoder, tiny_cfg.max_sequence_length)
    return WanComponents(transformer, vae, text, euler_scheduler({"flow_shift": 3.0, "num_train_timesteps": 1000}))


def load_wan(
    path, dtype: torch.dtype, need_text: bool = True, max_sequence_length: int = 512, empty_transformer: bool = False
) -> WanComponents:
    """Wan from a local diffusers-format directory (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan2.2-TI2V-5B-Diffusers)."""
    root = model_dir(path, PARTS, need_text, "Wan")
    index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
    if index.get("boundary_ratio") is not None or index.get("transformer_2", [None])[0] is not None:
        raise UserError(
            f"model.source {root} is a two-transformer Wan 2.2 (boundary_ratio / transformer_2, A14B), which this "
            "backbone does not train; use Wan 2.1 T2V-1.3B/14B or Wan 2.2 TI2V-5B"
        )
    transformer, vae, _ = load_denoiser(
        root, WanTransformer3DModel, AutoencoderKLWan, dtype, scheduler=False, empty=empty_transformer
    )
    config_file = root / "scheduler" / "scheduler_config.json"
    scheduler = load_part(root, "scheduler", lambda: euler_scheduler(json.loads(config_file.read_text())))
    text = None
    if need_text:
        tok, enc = load_single_encoder(root, UMT5EncoderModel, dtype)
        text = WanText(tok, enc, max_sequence_length)
    components = WanComponents(transformer, vae, text, scheduler)
    components.expand_timesteps = bool(index.get("expand_timesteps", False))
    return components


@torch.no_grad()
def encode(text: WanText, prompts: list[str]) -> torch.Tensor:
    """(P, S, D) with S = max_sequence_length: `WanPipeline.encode_prompt`'s embeddings (UMT5's last hidden state
    of the cleaned prompt padded to S, zeroed past its tokens)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    s = text.max_sequence_length
    tok = text.tokenizer(
        [prompt_clean(p) for p in prompts],
        padding="max_length",
        max_length=s,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text.text_encoder.parameters()).device
    mask = tok.attention_mask
    hidden = text.text_encoder(tok.input_ids.to(device), mask.to(device)).last_hidden_state
    hidden = hidden.to(text.text_encoder.dtype)
    out = hidden.new_zeros(hidden.shape)
    for i, n in enumerate(mask.gt(0).sum(dim=1).tolist()):
        out[i, :n] = hidden[i, :n]
    return out


def prompt_tensors(text: WanText, prompts: list[str]) -> dict[str, torch.Tensor]:
    return {"embeds": encode(text, prompts).cpu(), "neg_embeds": encode(text, [""] * len(prompts)).cpu()}


def geometry(components: WanComponents, size: int | tuple[int, int], num_frames: int = 1) -> Geometry:
    """(num_frames - 1) / 4 + 1 latent frames (the VAE's temporal factor) of (1, 2, 2)-patched latents; a frame
    count or side the VAE and patching cannot take is one UserError line naming a valid one."""
    vae, patch = components.vae.config, tuple(unwrap(components.transformer).config.patch_size)
    if patch != (1, 2, 2):
        raise UserError(f"the Wan transformer's patch_size {patch} is not (1, 2, 2), the only one this backbone packs")
    tf = vae.scale_factor_temporal
    if num_frames < 1 or (num_frames - 1) % tf:
        valid = max(1, (num_frames - 1) // tf * tf + 1)
        raise UserError(f"num_frames={num_frames}: Wan's VAE takes 1 + a multiple of {tf} frames; use e.g. {valid}")
    frames = (num_frames - 1) // tf + 1
    image = Geometry.of_patches(size, vae.scale_factor_spatial, vae.z_dim)
    return dataclasses.replace(image, tokens=frames * image.tokens, frames=frames)


def schedule(components: WanComponents, num_steps: int, geom: Geometry, device=None) -> torch.Tensor:
    """WanPipeline's `scheduler.set_timesteps(N)` on the flow-match Euler scheduler with the model's shift."""
    return pipeline_schedule(components.scheduler.config, num_steps, linspace=False, device=device)


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F (H/2)(W/2), 4 C): the transformer's (1, 2, 2) patches in its token order."""
    b, c, f, h, w = z.shape
    x = z.view(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, f * (h // 2) * (w // 2), 4 * c)


def unpack(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(B, F (h/2)(w/2), 4 C) -> (B, C, F, h, w), the inverse of `pack`."""
    b, _, c4 = x.shape
    z = x.view(b, geom.frames, geom.h // 2, geom.w // 2, c4 // 4, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
    return z.reshape(b, c4 // 4, geom.frames, geom.h, geom.w)


class WanVelocity(ConditionedVelocity):
    """`v(x, t)` with WanPipeline's true CFG `v_neg + g (v_pos - v_neg)` (no CFG at g <= 1); `uncond_grad=False`:
    a grad-enabled call runs the negative branch without grad. The timestep is `t * 1000` in float32 (the
    scheduler's timesteps), per token where the model expands timesteps (Wan 2.2 TI2V)."""

    CONDITIONING = ("embeds", "neg_embeds")

    def __init__(self, transformer, embeds, neg_embeds, geom: Geometry, guidance: float, uncond_grad: bool = True):
        self.transformer, self.geom = transformer, geom
        self.embeds, self.neg_embeds = embeds, neg_embeds
        self.guidance, self.uncond_grad = float(guidance), uncond_grad
        self.expand = expands_timesteps(transformer)

    def _forward(self, z, timestep, embeds):
        return self.transformer(
            hidden_states=z, timestep=timestep, encoder_hidden_states=embeds.to(z.dtype), return_dict=False
        )[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # one autograd state for torch.compile (see FluxVelocity)
        z = unpack(x, self.geom)
        timestep = t.float() * 1000
        if self.expand:  # the pipeline's (mask[0][0][:, ::2, ::2] * t).flatten(), per sample
            timestep = timestep[:, None].expand(-1, self.geom.tokens)
        v = self._forward(z, timestep, self.embeds)
        if self.guidance > 1.0:
            if self.uncond_grad or not torch.is_grad_enabled():
                v_neg = self._forward(z, timestep, self.neg_embeds)
            else:
                with torch.no_grad():
                    v_neg = self._forward(z, timestep, self.neg_embeds)
            v = v_neg + self.guidance * (v - v_neg)
        return pack(v)


def velocity(
    transformer, cond: dict[str, torch.Tensor], geom: Geometry, guidance: float | None, uncond_grad: bool = True
) -> WanVelocity:
    return WanVelocity(
        transformer, cond["embeds"], cond["neg_embeds"], geom, 1.0 if guidance is None else guidance, uncond_grad
    )


def vae_latents(vae: AutoencoderKLWan, x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Packed latents -> the VAE's (B, C, F, h, w), un-normalised with its per-channel mean and std (as the
    pipeline: divided by 1 / std)."""
    z = unpack(x, geom).to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    return z / inv_std + mean


def _frame(decoder, x: torch.Tensor, first: bool, *cache):
    """One latent frame through the causal decoder: (frames out, *the decoder's cache after it)."""
    cache = list(cache)
    out = decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
    return (out, *cache)


def decode_per_frame(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan.decode` (untiled) with each latent frame's decoder call recomputed in the backward. The
    decoder's causal cache (the last frames of each causal conv's input) goes in and out of each call as tensors,
    so the backward keeps only the caches and recomputes one frame's graph at a time, instead of holding the graph
    of every frame (AutoencoderKLWan has no gradient checkpointing of its own). Values and gradients are the
    decode's: the same operations on the same inputs."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
    from torch.utils.checkpoint import checkpoint

    x = vae.post_quant_conv(z)
    cache = [None] * vae._cached_conv_counts["decoder"]
    outs = []
    for i in range(x.shape[2]):
        out, *cache = checkpoint(_frame, vae.decoder, x[:, :, i : i + 1], i == 0, *cache, use_reentrant=False)
        outs.append(out)
    out = torch.cat(outs, 2)
    if vae.config.patch_size is not None:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    return torch.clamp(out, min=-1.0, max=1.0)


def decode(vae: AutoencoderKLWan, x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Packed latents -> video (B, num_frames, 3, H, W) in [0, 1]. With `model.checkpoint_decode` (the VAE marked
    by recompute.py) a grad-enabled decode recomputes one latent frame at a time in the backward."""
    z = vae_latents(vae, x, geom)
    if torch.is_grad_enabled() and getattr(vae, DECODE_RECOMPUTED, False):
        video = decode_per_frame(vae, z)
    else:
        video = vae.decode(z, return_dict=False)[0]  # (B, 3, T, H, W) in [-1, 1]
    return (video.float() * 0.5 + 0.5).clamp(0.0, 1.0).transpose(1, 2)


def decoder_width(vae: AutoencoderKLWan) -> int:
    """The causal 3D VAE's widest stage: its decoder's base dim x its largest multiplier."""
    return (vae.config.decoder_base_dim or vae.config.base_dim) * max(vae.config.dim_mult)


@torch.no_grad()
def pipeline_sample(
    components: WanComponents,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    geom: Geometry,
    num_steps: int,
    guidance: float,
) -> torch.Tensor:
    """WanPipeline's packed latents from the same noise and cached embeddings, with our Euler scheduler."""
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=components.vae,
        transformer=components.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config),
        expand_timesteps=components.expand_timesteps,
    )
    pipe.set_progress_bar_config(disable=True)
    vae = components.vae.config
    height, width = geom.pixels(vae.scale_factor_spatial)
    z = pipe(
        prompt_embeds=cond["embeds"],
        negative_prompt_embeds=cond["neg_embeds"],
        latents=unpack(noise, geom),
        height=height,
        width=width,
        num_frames=(geom.frames - 1) * vae.scale_factor_temporal + 1,
        num_inference_steps=num_steps,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
        max_sequence_length=cond["embeds"].shape[1],
    )[0]
    return pack(z)


BACKBONE = Backbone(
    name="wan",
    pipeline="WanPipeline",
    build_tiny=build_tiny_wan,
    load=load_wan,
    encode_prompts=prompt_tensors,
    conditioning=WanVelocity.CONDITIONING,
    geometry=geometry,
    schedule=schedule,
    velocity=velocity,
    decode=decode,
    lora_targets=LORA_TARGETS,
    decoder_width=decoder_width,
    pipeline_sample=pipeline_sample,
    video=True,
)

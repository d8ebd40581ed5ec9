"""The Z-Image backbone (Z-Image-Turbo and the base Z-Image as diffusers ships them): ZImageTransformer2DModel, FLUX.1's
AutoencoderKL (scaling and shift factors), the Qwen3 text encoder as `ZImagePipeline.encode_prompt` uses it (chat
template with thinking enabled, the penultimate hidden state of each prompt's tokens only), linspace(1, 1/N) sigmas
through the model's scheduler (Turbo's: a static shift 3), and the pipeline's CFG.

The pipeline's conventions, kept exactly:
- the transformer's time is `1 - sigma` (computed as the pipeline does, `(1000 - 1000 sigma) / 1000`) and its output
  is minus the flow velocity;
- CFG runs when guidance > 0 (Turbo: guidance 0, one forward a step), as `pos + g (pos - neg)` in float32 from one
  forward over [pos, neg] with the empty negative prompt; `cfg_normalization` (clamp |pred| to c |pos| per sample)
  and `cfg_truncation` (no CFG where 1 - sigma > the value) with the pipeline's defaults (off);
- its latents stay float32 whatever the transformer's dtype (`latent_dtype`), so bf16 samples are the pipeline's.

The transformer takes each prompt's embeddings at its own length (it pads them to a multiple of 32 with a learnt pad
token): the cache holds them left-aligned, zero-padded to max_sequence_length with a mask, and the velocity passes
row i's first `mask[i].sum()` tokens. Those lengths make the forward's shapes depend on the prompts, so no CUDA graph
is captured for it (`graphable=False`: model.cuda_graph is refused with one line before anything loads). Packed
latents are FLUX's 2x2 packing of the (B, 16, h, w) VAE latents, the transformer's own patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from leapalign_fast.errors import UserError
from leapalign_fast.models.backbone import Backbone, ConditionedVelocity, Geometry
from leapalign_fast.models.common import (
    SINGLE_ENCODER_PARTS,
    load_denoiser,
    load_single_encoder,
    model_dir,
    pack_latents,
    pipeline_schedule,
    tiny_flux_vae,
    unpack_latents,
)
from leapalign_fast.models.text import build_tiny_qwen_tokenizer

# Every linear of the attention and the SwiGLU feed-forward of each ZImageTransformerBlock (the main layers and the
# noise / context refiners), the modules the Z-Image LoRAs of DiffSynth-Studio and ai-toolkit adapt.
LORA_TARGETS = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


@dataclass
class ZImageText:
    tokenizer: object  # Qwen2Tokenizer
    text_encoder: Qwen3Model
    max_sequence_length: int


@dataclass
class ZImageComponents:
    transformer: ZImageTransformer2DModel
    vae: AutoencoderKL
    text: ZImageText | None
    scheduler: FlowMatchEulerDiscreteScheduler


def build_tiny_zimage(tiny_cfg, seed: int) -> ZImageComponents:
    """Random-init tiny Z-Image: transformer (heads x head_dim wide, layers + single_layers main blocks, one refiner
    of each kind), a FLUX.1-style AutoencoderKL (8x, 16 channels), a 2-layer Qwen3 (hidden size text_dim), Turbo's
    scheduler (static shift 3)."""
    if tiny_cfg.head_dim % 8:
        raise UserError(f"model.tiny.head_dim={tiny_cfg.head_dim} must be divisible by 8 (rope axes split it)")
    torch.manual_seed(seed)
    q = tiny_cfg.head_dim // 8
    transformer = ZImageTransformer2DModel(
        in_channels=16,
        dim=tiny_cfg.heads * tiny_cfg.head_dim,
        n_layers=tiny_cfg.layers + tiny_cfg.single_layers,
        n_refiner_layers=1,
        n_heads=tiny_cfg.heads,
        n_kv_heads=tiny_cfg.heads,
        cap_feat_dim=tiny_cfg.text_dim,
        axes_dims=[2 * q, 3 * q, 3 * q],
        axes_lens=[1024, 512, 512],
    )
    with torch.no_grad():  # the pad tokens start at zero: random ones, so a test sees the caption padding
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = tiny_flux_vae(tiny_cfg.vae_channels).eval()
    torch.manual_seed(seed + 1)
    tok = build_tiny_qwen_tokenizer()
    d = tiny_cfg.text_dim
    encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=d // 2,
            max_position_embeddings=256,
            use_cache=False,
        )
    ).eval()
    text = ZImageText(tok, encoder, tiny_cfg.max_sequence_length)
    return ZImageComponents(transformer, vae, text, FlowMatchEulerDiscreteScheduler(shift=3.0))


def load_zimage(
    path, dtype: torch.dtype, need_text: bool = True, max_sequence_length: int = 512, empty_transformer: bool = False
) -> ZImageComponents:
    """Z-Image from a local diffusers-format directory (a snapshot of Tongyi-MAI/Z-Image-Turbo or Z-Image)."""
    root = model_dir(path, SINGLE_ENCODER_PARTS, need_text, "Z-Image")
    transformer, vae, scheduler = load_denoiser(
        root, ZImageTransformer2DModel, AutoencoderKL, dtype, empty=empty_transformer
    )
    text = None
    if need_text:
        tok, enc = load_single_encoder(root, Qwen3Model, dtype)
        text = ZImageText(tok, enc, max_sequence_length)
    return ZImageComponents(transformer, vae, text, scheduler)


@torch.no_grad()
def encode(text: ZImageText, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (P, S, D), mask (P, S)) with S = max_sequence_length: row i's first mask[i].sum() tokens are
    `ZImagePipeline.encode_prompt`'s i-th tensor (the penultimate hidden state at the prompt's tokens), then zeros."""
    chats = [
        text.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in prompts
    ]
    s = text.max_sequence_length
    tok = text.tokenizer(chats, padding="max_length", max_length=s, truncation=True, return_tensors="pt")
    device = next(text.text_encoder.parameters()).device
    mask = tok.attention_mask.to(device).bool()
    hidden = text.text_encoder(
        input_ids=tok.input_ids.to(device), attention_mask=mask, output_hidden_states=True
    ).hidden_states[-2]
    embeds = hidden.new_zeros(len(prompts), s, hidden.shape[-1])
    out_mask = torch.zeros(len(prompts), s, dtype=torch.long)
    for i, (h, m) in enumerate(zip(hidden, mask)):
        valid = h[m]
        embeds[i, : len(valid)] = valid
        out_mask[i, : len(valid)] = 1
    return embeds, out_mask


def prompt_tensors(text: ZImageText, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Each prompt's embeddings and the empty negative prompt's (the pipeline's default), batched as it does."""
    embeds, mask = encode(text, prompts)
    neg, neg_mask = encode(text, [""] * len(prompts))
    return {"embeds": embeds.cpu(), "mask": mask, "neg_embeds": neg.cpu(), "neg_mask": neg_mask}


def vae_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def geometry(components: ZImageComponents, resolution: int | tuple[int, int]) -> Geometry:
    return Geometry.of_patches(resolution, vae_factor(components.vae), components.vae.config.latent_channels)


def schedule(components: ZImageComponents, num_steps: int, geom: Geometry, device=None) -> torch.Tensor:
    """The pipeline's: torch.linspace(1, 1/N) sigmas through its scheduler, mu of the token count where the config
    shifts dynamically (Turbo's static shift 3 ignores it), 0 appended."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    c = components.scheduler.config
    mu = calculate_shift(
        geom.tokens,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )
    if num_steps < 1:  # (pipeline_schedule's line, before torch.linspace's own error)
        return pipeline_schedule(c, num_steps)
    sigmas = get_default_z_image_sigmas(num_steps)  # torch's float32 linspace, not numpy's
    return pipeline_schedule(c, num_steps, mu=mu, flow_sigmas=False, device=device, sigmas=sigmas)


class ZImageVelocity(ConditionedVelocity):
    """`v(x, t)` = minus the transformer's output at time 1 - t, with ZImagePipeline's CFG where guidance > 0.
    `uncond_grad=False`: a grad-enabled call runs the negative branch in its own forward without grad. t is (B,) in
    [0, 1]; the result is float32 (the pipeline's noise_pred)."""

    def __init__(
        self,
        transformer,
        embeds: list[torch.Tensor],
        neg_embeds: list[torch.Tensor],
        h: int,
        w: int,
        guidance: float,
        uncond_grad: bool = True,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
    ):
        self.transformer, self.embeds, self.neg_embeds, self.h, self.w = transformer, embeds, neg_embeds, h, w
        self.guidance, self.uncond_grad = float(guidance), uncond_grad
        self.cfg_normalization, self.cfg_truncation = float(cfg_normalization), float(cfg_truncation)
        self.dtype = embeds[0].dtype  # the transformer's input dtype: the model's (the cache's) dtype

    def conditioning(self):
        raise UserError(
            "model.cuda_graph=true cannot capture Z-Image's forward: it takes each prompt's embeddings at their own "
            "length, so its shapes change with the prompts; set model.cuda_graph=false"
        )

    def _forward(self, z: torch.Tensor, t: torch.Tensor, embeds: list[torch.Tensor]) -> torch.Tensor:
        out = self.transformer(list(z.unsqueeze(2).unbind(0)), t, embeds, return_dict=False)[0]
        return torch.stack([o.float() for o in out]).squeeze(2)

    def _cfg(self, pos: torch.Tensor, neg: torch.Tensor, guidance) -> torch.Tensor:
        """The pipeline's per-sample `pos + g (pos - neg)`, its norm clamped to cfg_normalization x |pos| if set."""
        pred = pos + guidance * (pos - neg)
        if self.cfg_normalization > 0.0:
            rows = []
            for p, q in zip(pos, pred):
                limit = torch.linalg.vector_norm(p) * self.cfg_normalization
                norm = torch.linalg.vector_norm(q)
                rows.append(torch.where(norm > limit, q * (limit / norm), q))
            pred = torch.stack(rows)
        return pred

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # one autograd state for torch.compile (see FluxVelocity)
        z = unpack_latents(x.contiguous(), self.h, self.w).to(self.dtype)
        ts = (1000 - t.float() * 1000) / 1000  # the pipeline's (1000 - timestep) / 1000, timestep = 1000 sigma
        guidance = self.guidance  # a Python number as in the pipeline (the same float32 product)
        if guidance > 0.0 and self.cfg_truncation < 1.0:  # the pipeline: no CFG where 1 - sigma > the truncation
            keep = ts.double() <= self.cfg_truncation  # its comparison of Python floats
            if not bool(keep.all()):  # one host sync per call, only with a truncation set
                guidance = torch.where(keep, guidance, 0.0).float().view(-1, 1, 1, 1) if keep.any() else 0.0
        if not isinstance(guidance, torch.Tensor) and guidance <= 0.0:
            return pack_latents(-self._forward(z, ts, self.embeds))
        b = z.shape[0]
        if self.uncond_grad or not torch.is_grad_enabled():
            out = self._forward(torch.cat([z, z]), torch.cat([ts, ts]), self.embeds + self.neg_embeds)
            pos, neg = out[:b], out[b:]
        else:
            pos = self._forward(z, ts, self.embeds)
            with torch.no_grad():
                neg = self._forward(z, ts, self.neg_embeds)
        return pack_latents(-self._cfg(pos, neg, guidance))


def _rows(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's valid (left-aligned) tokens: the per-prompt tensors the transformer takes."""
    return [e[:n] for e, n in zip(embeds, mask.bool().sum(1).tolist())]  # one host sync per batch, not per step


def velocity(
    transformer,
    cond: dict[str, torch.Tensor],
    geom: Geometry,
    guidance: float | None,
    uncond_grad: bool = True,
    cfg_normalization: float = 0.0,
    cfg_truncation: float = 1.0,
) -> ZImageVelocity:
    """The velocity at ZImagePipeline's `guidance_scale` (None: 0, no CFG); `cfg_normalization` and
    `cfg_truncation` as the pipeline's arguments (their defaults: off; the trainer uses those)."""
    return ZImageVelocity(
        transformer,
        _rows(cond["embeds"], cond["mask"]),
        _rows(cond["neg_embeds"], cond["neg_mask"]),
        geom.h,
        geom.w,
        0.0 if guidance is None else guidance,
        uncond_grad,
        cfg_normalization,
        cfg_truncation,
    )


def decode(vae: AutoencoderKL, x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Packed latents -> images in [0, 1]: the pipeline's `z / scaling_factor + shift_factor`, differentiable."""
    z = unpack_latents(x, geom.h, geom.w) / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (image.float() * 0.5 + 0.5).clamp(0.0, 1.0)


def decoder_width(vae: AutoencoderKL) -> int:
    return max(vae.config.block_out_channels)


def pipeline(components: ZImageComponents):
    """ZImagePipeline over the components (text encoder and tokenizer where loaded), progress bar off."""
    from diffusers import ZImagePipeline

    text = components.text
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config),
        vae=components.vae,
        text_encoder=None if text is None else text.text_encoder,
        tokenizer=None if text is None else text.tokenizer,
        transformer=components.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def pipeline_sample(
    components: ZImageComponents,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    geom: Geometry,
    num_steps: int,
    guidance: float,
    **cfg_options,
) -> torch.Tensor:
    """ZImagePipeline's latents (float32, B x 16 x h x w), packed, from the same noise and cached embeddings;
    `cfg_options`: its cfg_normalization / cfg_truncation."""
    height, width = geom.pixels(vae_factor(components.vae))
    z = pipeline(components)(
        prompt_embeds=_rows(cond["embeds"], cond["mask"]),
        negative_prompt_embeds=_rows(cond["neg_embeds"], cond["neg_mask"]),
        latents=unpack_latents(noise, geom.h, geom.w),
        height=height,
        width=width,
        num_inference_steps=num_steps,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
        **cfg_options,
    )[0]
    return pack_latents(z)


BACKBONE = Backbone(
    name="zimage",
    pipeline="ZImagePipeline",
    build_tiny=build_tiny_zimage,
    load=load_zimage,
    encode_prompts=prompt_tensors,
    conditioning=("embeds", "mask", "neg_embeds", "neg_mask"),
    geometry=geometry,
    schedule=schedule,
    velocity=velocity,
    decode=decode,
    lora_targets=LORA_TARGETS,
    decoder_width=decoder_width,
    pipeline_sample=pipeline_sample,
    latent_dtype=torch.float32,
    graphable=False,
    transformer_size=lambda c: (c.dim, c.n_layers + c.n_refiner_layers),  # a token passes one refiner's blocks
)

"""The Qwen-Image backbone: QwenImageTransformer2DModel, AutoencoderKLQwenImage (per-channel latent mean/std), the
Qwen2.5-VL text encoder as `QwenImagePipeline` uses it (system-prompt template, its first 34 tokens dropped, last
hidden state with a mask), the FLUX-style dynamic shift through its scheduler, and true CFG with the pipeline's
norm rescale `comb * |v_pos| / |comb|` and the empty negative prompt.

Prompt embeddings are cached padded (zeros) to `max_sequence_length` with their mask, so every batch has one shape.
Packed latents are FLUX's 2x2 packing (models/common.py) of the (B, 16, h, w) latents of the single frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from leapalign_fast.errors import UserError
from leapalign_fast.models.backbone import Backbone, ConditionedVelocity, Geometry
from leapalign_fast.models.common import (
    SINGLE_ENCODER_PARTS,
    load_denoiser,
    load_single_encoder,
    model_dir,
    pipeline_schedule,
    unpack_latents,
)
from leapalign_fast.models.text import build_tiny_qwen_tokenizer

LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
# QwenImagePipeline's prompt template and the number of its leading tokens dropped from the hidden states.
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP = 34


@dataclass
class QwenImageText:
    tokenizer: object  # Qwen2Tokenizer
    text_encoder: Qwen2_5_VLForConditionalGeneration
    max_sequence_length: int


@dataclass
class QwenImageComponents:
    transformer: QwenImageTransformer2DModel
    vae: AutoencoderKLQwenImage
    text: QwenImageText | None
    scheduler: FlowMatchEulerDiscreteScheduler


def build_tiny_qwenimage(tiny_cfg, seed: int) -> QwenImageComponents:
    """Random-init tiny Qwen-Image: transformer, a small AutoencoderKLQwenImage (8x), a 2-layer Qwen2.5-VL."""
    if tiny_cfg.head_dim % 8:
        raise UserError(f"model.tiny.head_dim={tiny_cfg.head_dim} must be divisible by 8 (rope axes split it)")
    torch.manual_seed(seed)
    q = tiny_cfg.head_dim // 8
    transformer = QwenImageTransformer2DModel(
        in_channels=64,
        out_channels=16,
        num_layers=tiny_cfg.layers + tiny_cfg.single_layers,
        attention_head_dim=tiny_cfg.head_dim,
        num_attention_heads=tiny_cfg.heads,
        joint_attention_dim=tiny_cfg.text_dim,
        axes_dims_rope=(2 * q, 3 * q, 3 * q),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=max(4, tiny_cfg.vae_channels // 2),
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    torch.manual_seed(seed + 1)
    tok = build_tiny_qwen_tokenizer()
    d = tiny_cfg.text_dim
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [d // 16, d // 16, d // 4 - 2 * (d // 16)]},
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=d, fullatt_block_indexes=[0]
        ),
    )
    text = QwenImageText(tok, Qwen2_5_VLForConditionalGeneration(config).eval(), tiny_cfg.max_sequence_length)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )  # Qwen-Image's config
    return QwenImageComponents(transformer, vae, text, scheduler)


def load_qwenimage(
    path, dtype: torch.dtype, need_text: bool = True, max_sequence_length: int = 512, empty_transformer: bool = False
) -> QwenImageComponents:
    """Qwen-Image from a local diffusers-format directory (a snapshot of Qwen/Qwen-Image)."""
    root = model_dir(path, SINGLE_ENCODER_PARTS, need_text, "Qwen-Image")
    transformer, vae, scheduler = load_denoiser(
        root, QwenImageTransformer2DModel, AutoencoderKLQwenImage, dtype, empty=empty_transformer
    )
    text = None
    if need_text:
        tok, enc = load_single_encoder(root, Qwen2_5_VLForConditionalGeneration, dtype)
        text = QwenImageText(tok, enc, max_sequence_length)
    return QwenImageComponents(transformer, vae, text, scheduler)


@torch.no_grad()
def encode(text: QwenImageText, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (P, S, D), mask (P, S)) with S = max_sequence_length: `QwenImagePipeline.encode_prompt`'s
    embeddings (last hidden state after the template's first 34 tokens), zero-padded to S."""
    tok = text.tokenizer(
        [TEMPLATE.format(p) for p in prompts],
        max_length=1024 + DROP,
        padding=True,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text.text_encoder.parameters()).device
    mask = tok.attention_mask.to(device)
    hidden = text.text_encoder(
        input_ids=tok.input_ids.to(device), attention_mask=mask, output_hidden_states=True
    ).hidden_states[-1]
    s = text.max_sequence_length
    embeds = hidden.new_zeros(len(prompts), s, hidden.shape[-1])
    out_mask = torch.zeros(len(prompts), s, dtype=torch.long)
    for i, (h, m) in enumerate(zip(hidden, mask.bool())):
        valid = h[m][DROP:][:s]
        embeds[i, : len(valid)] = valid
        out_mask[i, : len(valid)] = 1
    return embeds.to(text.text_encoder.dtype), out_mask


def prompt_tensors(text: QwenImageText, prompts: list[str]) -> dict[str, torch.Tensor]:
    embeds, mask = encode(text, prompts)
    neg, neg_mask = encode(text, [""] * len(prompts))  # batched as the pipeline's negative_prompt=[""] * n
    return {"embeds": embeds.cpu(), "mask": mask, "neg_embeds": neg.cpu(), "neg_mask": neg_mask}


def geometry(components: QwenImageComponents, resolution: int | tuple[int, int]) -> Geometry:
    return Geometry.of_patches(resolution, 2 ** len(components.vae.temperal_downsample), components.vae.config.z_dim)


def schedule(components: QwenImageComponents, num_steps: int, geom: Geometry, device=None) -> torch.Tensor:
    """The pipeline's: linspace(1, 1/N) sigmas through its scheduler with mu from the token count. One step is
    refused (one UserError line): Qwen-Image's `shift_terminal` makes its only sigma NaN."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    c = components.scheduler.config
    mu = calculate_shift(
        geom.tokens,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )
    return pipeline_schedule(c, num_steps, mu=mu, flow_sigmas=False, device=device)


class QwenImageVelocity(ConditionedVelocity):
    """`v(x, t)` with Qwen-Image's true CFG: `comb = v_neg + g (v_pos - v_neg)`, rescaled per token to |v_pos|.
    `uncond_grad=False`: a grad-enabled call runs the negative branch without grad. t is (B,) in [0, 1]."""

    CONDITIONING = ("embeds", "mask", "neg_embeds", "neg_mask")

    def __init__(
        self, transformer, embeds, mask, neg_embeds, neg_mask, h: int, w: int, guidance: float, uncond_grad: bool = True
    ):
        self.transformer, self.h, self.w = transformer, h, w
        self.embeds, self.mask, self.neg_embeds, self.neg_mask = embeds, mask, neg_embeds, neg_mask
        self.guidance, self.uncond_grad = float(guidance), uncond_grad

    def _forward(self, x, t, embeds, mask):
        return self.transformer(
            hidden_states=x,
            timestep=t,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds.to(x.dtype),
            img_shapes=[[(1, self.h // 2, self.w // 2)]] * x.shape[0],
            return_dict=False,
        )[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # one autograd state for torch.compile (see FluxVelocity)
        x = x.contiguous()
        ts = (t.float() * 1000).to(x.dtype) / 1000  # the pipeline's `t.to(latents.dtype) / 1000`
        v = self._forward(x, ts, self.embeds, self.mask)
        if self.guidance <= 1.0:
            return v
        if self.uncond_grad or not torch.is_grad_enabled():
            v_neg = self._forward(x, ts, self.neg_embeds, self.neg_mask)
        else:
            with torch.no_grad():
                v_neg = self._forward(x, ts, self.neg_embeds, self.neg_mask)
        comb = v_neg + self.guidance * (v - v_neg)
        return comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def velocity(
    transformer, cond: dict[str, torch.Tensor], geom: Geometry, guidance: float | None, uncond_grad: bool = True
) -> QwenImageVelocity:
    return QwenImageVelocity(
        transformer, **cond, h=geom.h, w=geom.w, guidance=1.0 if guidance is None else guidance, uncond_grad=uncond_grad
    )


def vae_latents(vae: AutoencoderKLQwenImage, x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Packed latents -> the VAE's (B, 16, 1, h, w), un-normalised with its per-channel mean and std (as the
    pipeline: divided by 1 / std)."""
    z = unpack_latents(x, geom.h, geom.w).unsqueeze(2).to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    return z / inv_std + mean


def decode(vae: AutoencoderKLQwenImage, x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    image = vae.decode(vae_latents(vae, x, geom), return_dict=False)[0][:, :, 0]
    return (image.float() * 0.5 + 0.5).clamp(0.0, 1.0)


def decoder_width(vae: AutoencoderKLQwenImage) -> int:
    """The causal 3D VAE's widest stage: base_dim x its largest multiplier (no block_out_channels)."""
    return vae.config.base_dim * max(vae.config.dim_mult)


@torch.no_grad()
def pipeline_sample(
    components: QwenImageComponents,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    geom: Geometry,
    num_steps: int,
    guidance: float,
) -> torch.Tensor:
    """QwenImagePipeline's packed latents from the same noise and cached (padded, masked) embeddings."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config),
        vae=components.vae,
        text_encoder=None,
        tokenizer=None,
        transformer=components.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    height, width = geom.pixels(2 ** len(components.vae.temperal_downsample))
    return pipe(
        prompt_embeds=cond["embeds"],
        prompt_embeds_mask=cond["mask"],
        negative_prompt_embeds=cond["neg_embeds"],
        negative_prompt_embeds_mask=cond["neg_mask"],
        latents=noise,
        height=height,
        width=width,
        num_inference_steps=num_steps,
        true_cfg_scale=guidance,
        output_type="latent",
        return_dict=False,
        max_sequence_length=cond["embeds"].shape[1],
    )[0]


BACKBONE = Backbone(
    name="qwenimage",
    pipeline="QwenImagePipeline",
    build_tiny=build_tiny_qwenimage,
    load=load_qwenimage,
    encode_prompts=prompt_tensors,
    conditioning=QwenImageVelocity.CONDITIONING,
    geometry=geometry,
    schedule=schedule,
    velocity=velocity,
    decode=decode,
    lora_targets=LORA_TARGETS,
    decoder_width=decoder_width,
    pipeline_sample=pipeline_sample,
)

"""The FLUX.2-Klein backbone: Flux2Transformer2DModel, AutoencoderKLFlux2 (2x2 patchify + batch-norm latent
normalisation), the Qwen3 text encoder as `Flux2KleinPipeline` uses it (chat template, hidden states of three
layers stacked), its empirical-mu schedule, and true CFG with the empty negative prompt (Klein base). A step-wise
distilled Klein (`is_distilled` in the directory's model_index.json, the pipeline's config) runs no CFG whatever
the guidance, as the pipeline: one forward per step.

Packed latents are the pipeline's own: (B, (h/2)(w/2), 4 C) of the patchified, normalised VAE latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from leapalign_fast.errors import UserError
from leapalign_fast.models.backbone import Backbone, ConditionedVelocity, Geometry
from leapalign_fast.models.common import (
    SINGLE_ENCODER_PARTS,
    load_denoiser,
    load_single_encoder,
    log_once,
    model_dir,
    pipeline_schedule,
    unwrap,
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
    "attn.to_qkv_mlp_proj",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
)


@dataclass
class Flux2Text:
    tokenizer: object  # Qwen2TokenizerFast
    text_encoder: Qwen3ForCausalLM
    max_sequence_length: int
    out_layers: tuple[int, ...] = (9, 18, 27)  # hidden states stacked (Klein: 9, 18, 27)


# The pipeline's `is_distilled`, marked on the bare transformer: the velocity is built from the transformer alone.
_DISTILLED = "_leapalign_klein_is_distilled"


def is_distilled(transformer) -> bool:
    """Whether `transformer` is a step-wise distilled Klein's (Flux2KleinPipeline then never runs CFG)."""
    return bool(getattr(unwrap(transformer), _DISTILLED, False))


@dataclass
class Flux2Components:
    transformer: Flux2Transformer2DModel
    vae: AutoencoderKLFlux2
    text: Flux2Text | None
    scheduler: FlowMatchEulerDiscreteScheduler

    @property
    def is_distilled(self) -> bool:
        """model_index.json's `is_distilled` (Flux2KleinPipeline's config), held by the transformer."""
        return is_distilled(self.transformer)

    @is_distilled.setter
    def is_distilled(self, value: bool) -> None:
        setattr(unwrap(self.transformer), _DISTILLED, bool(value))


def build_tiny_qwen3(vocab_size: int, hidden: int, layers: int) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=hidden // 2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            use_cache=False,
        )
    ).eval()


def build_tiny_flux2(tiny_cfg, seed: int) -> Flux2Components:
    """Random-init tiny Klein: transformer (no guidance embedding), an 8-channel AutoencoderKLFlux2 with random
    batch-norm statistics, a 3-layer Qwen3 whose 3 hidden states are stacked (joint dim 3 x text_dim / 2)."""
    if tiny_cfg.head_dim % 4:
        raise UserError(f"model.tiny.head_dim={tiny_cfg.head_dim} must be divisible by 4 (rope axes split it)")
    torch.manual_seed(seed)
    c, latent = tiny_cfg.vae_channels, 8
    hidden = tiny_cfg.text_dim // 2
    q = tiny_cfg.head_dim // 4
    transformer = Flux2Transformer2DModel(
        in_channels=4 * latent,
        num_layers=tiny_cfg.layers,
        num_single_layers=tiny_cfg.single_layers,
        attention_head_dim=tiny_cfg.head_dim,
        num_attention_heads=tiny_cfg.heads,
        joint_attention_dim=3 * hidden,
        timestep_guidance_channels=32,
        axes_dims_rope=(q, q, q, q),
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(c, c, c, c),
        layers_per_block=1,
        latent_channels=latent,
        norm_num_groups=min(8, c),
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()
    with torch.no_grad():  # non-trivial normalisation, so a test sees it applied
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(seed + 1)
    tok = build_tiny_qwen_tokenizer()
    text = Flux2Text(tok, build_tiny_qwen3(len(tok), hidden, 3), tiny_cfg.max_sequence_length, (1, 2, 3))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    return Flux2Components(transformer, vae, text, scheduler)


def load_flux2(
    path, dtype: torch.dtype, need_text: bool = True, max_sequence_length: int = 512, empty_transformer: bool = False
) -> Flux2Components:
    """FLUX.2-Klein from a local diffusers-format directory (e.g. black-forest-labs/FLUX.2-klein-base-9B)."""
    root = model_dir(path, SINGLE_ENCODER_PARTS, need_text, "FLUX.2-Klein")
    transformer, vae, scheduler = load_denoiser(
        root, Flux2Transformer2DModel, AutoencoderKLFlux2, dtype, empty=empty_transformer
    )
    text = None
    if need_text:
        tok, enc = load_single_encoder(root, Qwen3ForCausalLM, dtype)
        n = enc.config.num_hidden_layers  # Klein's encoders (36 layers) use the pipeline's 9, 18, 27; a small one
        text = Flux2Text(tok, enc, max_sequence_length, (9, 18, 27) if n >= 27 else (n // 3, 2 * n // 3, n))
    components = Flux2Components(transformer, vae, text, scheduler)
    components.is_distilled = _index_is_distilled(root)
    return components


def _index_is_distilled(root) -> bool:
    """`is_distilled` of `root/model_index.json`, where Flux2KleinPipeline.save_pretrained writes its config (absent:
    False, the pipeline's default); an unreadable index is one UserError line."""
    index = root / "model_index.json"
    if not index.is_file():
        return False
    try:
        return bool(json.loads(index.read_text()).get("is_distilled", False))
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"cannot read {index}: {e}; fix or remove the file (it should be a JSON object)") from e


@torch.no_grad()
def encode(text: Flux2Text, prompts: list[str]) -> torch.Tensor:
    """(P, S, len(out_layers) x D) as `Flux2KleinPipeline.encode_prompt`: each prompt in the chat template, padded
    to max_sequence_length, the chosen hidden states stacked per token."""
    ids, masks = [], []
    for prompt in prompts:
        chat = text.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        tok = text.tokenizer(
            chat, return_tensors="pt", padding="max_length", truncation=True, max_length=text.max_sequence_length
        )
        ids.append(tok["input_ids"])
        masks.append(tok["attention_mask"])
    device = next(text.text_encoder.parameters()).device
    out = text.text_encoder(
        input_ids=torch.cat(ids).to(device),
        attention_mask=torch.cat(masks).to(device),
        output_hidden_states=True,
        use_cache=False,
    )
    h = torch.stack([out.hidden_states[k] for k in text.out_layers], dim=1).to(text.text_encoder.dtype)
    b, n, s, d = h.shape
    return h.permute(0, 2, 1, 3).reshape(b, s, n * d)


def prompt_tensors(text: Flux2Text, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Each prompt's embeddings and the empty negative prompt's (per prompt, batched as the pipeline does)."""
    return {"embeds": encode(text, prompts).cpu(), "neg_embeds": encode(text, [""] * len(prompts)).cpu()}


def geometry(components: Flux2Components, resolution: int | tuple[int, int]) -> Geometry:
    return Geometry.of_patches(
        resolution, 2 ** (len(components.vae.config.block_out_channels) - 1), components.vae.config.latent_channels
    )


def schedule(components: Flux2Components, num_steps: int, geom: Geometry, device=None) -> torch.Tensor:
    """The pipeline's: linspace(1, 1/N) sigmas shifted by the empirical mu of (tokens, N), 0 appended."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    mu = compute_empirical_mu(geom.tokens, num_steps)
    return pipeline_schedule(components.scheduler.config, num_steps, mu=mu, device=device)


def ids(batch: int, length: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(txt_ids (B, S, 4) = (0, 0, 0, l), img_ids (B, L, 4) = (0, row, col, 0)) as the pipeline builds them."""
    z = torch.arange(1)
    txt = torch.cartesian_prod(z, z, z, torch.arange(length)).expand(batch, -1, -1)
    img = torch.cartesian_prod(z, torch.arange(h), torch.arange(w), z).expand(batch, -1, -1)
    return txt.to(device), img.to(device)


class Flux2Velocity(ConditionedVelocity):
    """`v(x, t)` with true CFG `v_neg + g (v_pos - v_neg)`, two forwards as the pipeline (no guidance embedding).
    `uncond_grad=False`: a grad-enabled call runs the negative branch without grad. t is (B,) in [0, 1]."""

    CONDITIONING = ("embeds", "neg_embeds", "txt_ids", "img_ids")

    def __init__(self, transformer, embeds, neg_embeds, txt_ids, img_ids, guidance: float, uncond_grad: bool = True):
        self.transformer, self.embeds, self.neg_embeds = transformer, embeds, neg_embeds
        self.txt_ids, self.img_ids = txt_ids, img_ids
        self.guidance, self.uncond_grad = float(guidance), uncond_grad

    def _forward(self, x, t, embeds):
        return self.transformer(
            hidden_states=x,
            timestep=t,
            guidance=None,
            encoder_hidden_states=embeds.to(x.dtype),
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # one autograd state for torch.compile (see FluxVelocity)
        x = x.contiguous()
        ts = (t.float() * 1000).to(x.dtype) / 1000  # the pipeline's `t.to(latents.dtype) / 1000`
        v = self._forward(x, ts, self.embeds)
        if self.guidance <= 1.0:
            return v
        if self.uncond_grad or not torch.is_grad_enabled():
            v_neg = self._forward(x, ts, self.neg_embeds)
        else:
            with torch.no_grad():
                v_neg = self._forward(x, ts, self.neg_embeds)
        return v_neg + self.guidance * (v - v_neg)


def velocity(
    transformer, cond: dict[str, torch.Tensor], geom: Geometry, guidance: float | None, uncond_grad: bool = True
) -> Flux2Velocity:
    """True CFG at `guidance` (> 1), except on a distilled Klein: no CFG, one forward, the guidance logged once as
    ignored (Flux2KleinPipeline's `do_classifier_free_guidance`: guidance > 1 and not is_distilled)."""
    if guidance is not None and guidance > 1.0 and is_distilled(transformer):
        log_once(
            f"guidance {guidance} is ignored: this FLUX.2-Klein is step-wise distilled (is_distilled in "
            "model_index.json), so no CFG, as in Flux2KleinPipeline"
        )
        guidance = 1.0
    embeds = cond["embeds"]
    txt, img = ids(embeds.shape[0], embeds.shape[1], geom.h // 2, geom.w // 2, embeds.device)
    return Flux2Velocity(
        transformer, embeds, cond["neg_embeds"], txt, img, 1.0 if guidance is None else guidance, uncond_grad
    )


def vae_latents(vae: AutoencoderKLFlux2, x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Packed normalised latents -> the VAE's (B, C, h, w): un-normalise with the batch-norm statistics, then
    unpatchify (the pipeline's `output_type="latent"`)."""
    b, _, c4 = x.shape
    z = x.permute(0, 2, 1).reshape(b, c4, geom.h // 2, geom.w // 2)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
    z = z * std + mean
    z = z.reshape(b, c4 // 4, 2, 2, geom.h // 2, geom.w // 2).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c4 // 4, geom.h, geom.w)


def packed_latents(vae: AutoencoderKLFlux2, z: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """The inverse of `vae_latents`: the VAE's (B, C, h, w) -> 2x2 patchify, normalise, pack to (B, L, 4 C)."""
    b, c = z.shape[:2]
    z = z.reshape(b, c, geom.h // 2, 2, geom.w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, geom.h // 2, -1)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
    return ((z - mean) / std).reshape(b, 4 * c, -1).permute(0, 2, 1)


def decode(vae: AutoencoderKLFlux2, x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    image = vae.decode(vae_latents(vae, x, geom).to(vae.dtype), return_dict=False)[0]
    return (image.float() * 0.5 + 0.5).clamp(0.0, 1.0)


def decoder_width(vae: AutoencoderKLFlux2) -> int:
    return max(vae.config.block_out_channels)


@torch.no_grad()
def pipeline_sample(
    components: Flux2Components,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    geom: Geometry,
    num_steps: int,
    guidance: float,
) -> torch.Tensor:
    """Flux2KleinPipeline's latents (un-normalised, unpatchified) from the same noise and cached embeddings, packed
    back into our layout."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config),
        vae=components.vae,
        text_encoder=None,
        tokenizer=None,
        transformer=components.transformer,
        is_distilled=components.is_distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    b, _, c4 = noise.shape
    height, width = geom.pixels(2 ** (len(components.vae.config.block_out_channels) - 1))
    z = pipe(
        prompt_embeds=cond["embeds"],
        negative_prompt_embeds=cond["neg_embeds"],
        latents=noise.permute(0, 2, 1).reshape(b, c4, geom.h // 2, geom.w // 2),
        height=height,
        width=width,
        num_inference_steps=num_steps,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
    )[0]
    return packed_latents(components.vae, z, geom)


BACKBONE = Backbone(
    name="flux2",
    pipeline="Flux2KleinPipeline",
    build_tiny=build_tiny_flux2,
    load=load_flux2,
    encode_prompts=prompt_tensors,
    conditioning=("embeds", "neg_embeds"),
    geometry=geometry,
    schedule=schedule,
    velocity=velocity,
    decode=decode,
    lora_targets=LORA_TARGETS,
    decoder_width=decoder_width,
    pipeline_sample=pipeline_sample,
)

"""Random-weight models of every backbone at full size and as toy-size stand-ins, built from the real diffusers
classes without a weights directory: the shapes and configs `bench/memory.py`, `bench/sampler.py` and
`bench/gpu_train_steps.py` measure. Only the weights (and prompt embeddings) are random: memory and speed do not
depend on their values. Full-size weights are built directly in the model dtype on the device.
"""

from __future__ import annotations

import contextlib

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)  # its transformer/config.json
SD3_VAE = dict(FLUX_VAE, scaling_factor=1.5305, shift_factor=0.0609)


# FLUX.2-klein-base-9B transformer/config.json (8 double + 24 single blocks, 32 x 128 heads, Qwen3-8B's 3 stacked
# hidden states: 3 x 4096); the other keys are the class defaults, as are the VAE's (AutoencoderKLFlux2).
KLEIN_9B = dict(
    num_layers=8,
    num_single_layers=24,
    num_attention_heads=32,
    attention_head_dim=128,
    joint_attention_dim=12288,
    guidance_embeds=False,
)


def _flux(transformer_kw, vae_kw, text_dim, pooled_dim):
    def build():
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        from leapalign_fast.models.flux import FluxComponents

        return FluxComponents(FluxTransformer2DModel(**transformer_kw), AutoencoderKL(**vae_kw).eval(), None)

    return "flux", "flux_leapalign.toml", build, lambda msl: {"t5": (msl, text_dim), "pooled": (pooled_dim,)}


def _sd3(transformer_kw, vae_kw):
    def build():
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        from leapalign_fast.models.sd3 import SHIFT, SD3Components

        return SD3Components(
            SD3Transformer2DModel(**transformer_kw),
            AutoencoderKL(**vae_kw).eval(),
            None,
            FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        )

    d, p = transformer_kw["joint_attention_dim"], transformer_kw["pooled_projection_dim"]
    shapes = lambda msl: {"embeds": (77 + msl, d), "pooled": (p,), "neg_embeds": (77 + msl, d), "neg_pooled": (p,)}  # noqa: E731
    return "sd3", "sd35_medium_leapalign.toml", build, shapes


def _flux2(transformer_kw, vae_kw):
    def build():
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

        from leapalign_fast.models.flux2 import Flux2Components

        return Flux2Components(
            Flux2Transformer2DModel(**transformer_kw),
            AutoencoderKLFlux2(**vae_kw).eval(),
            None,
            FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        )

    d = transformer_kw["joint_attention_dim"]
    return "flux2", "flux2_klein_leapalign.toml", build, lambda msl: {"embeds": (msl, d), "neg_embeds": (msl, d)}


def _qwenimage(transformer_kw, vae_kw):
    def build():
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

        from leapalign_fast.models.qwenimage import QwenImageComponents

        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=0.9,
            base_image_seq_len=256,
            max_image_seq_len=8192,
            shift_terminal=0.02,
            time_shift_type="exponential",
        )
        return QwenImageComponents(
            QwenImageTransformer2DModel(**transformer_kw), AutoencoderKLQwenImage(**vae_kw).eval(), None, scheduler
        )

    d = transformer_kw.get("joint_attention_dim", 3584)
    shapes = lambda msl: {"embeds": (msl, d), "mask": (msl,), "neg_embeds": (msl, d), "neg_mask": (msl,)}  # noqa: E731
    return "qwenimage", "qwen_image_leapalign.toml", build, shapes


def _zimage(transformer_kw, vae_kw):
    def build():
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

        from leapalign_fast.models.zimage import ZImageComponents

        return ZImageComponents(
            ZImageTransformer2DModel(**transformer_kw),
            AutoencoderKL(**vae_kw).eval(),
            None,
            FlowMatchEulerDiscreteScheduler(shift=3.0),  # Z-Image-Turbo's scheduler_config.json
        )

    d = transformer_kw.get("cap_feat_dim", 2560)
    shapes = lambda msl: {"embeds": (msl, d), "mask": (msl,), "neg_embeds": (msl, d), "neg_mask": (msl,)}  # noqa: E731
    return "zimage", "zimage_leapalign.toml", build, shapes


# Wan 2.1 T2V-1.3B and Wan 2.2 TI2V-5B transformer/config.json (the other keys: the class defaults, which are
# Wan's); Wan 2.1's VAE is AutoencoderKLWan's defaults, Wan 2.2's the 16x patchified one (48 channels; its latent
# mean/std are 0/1 here: random weights).
WAN21_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096)
WAN22_5B = dict(
    num_attention_heads=24,
    attention_head_dim=128,
    ffn_dim=14336,
    num_layers=30,
    text_dim=4096,
    in_channels=48,
    out_channels=48,
)
WAN22_VAE = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    in_channels=12,
    out_channels=12,
    is_residual=True,
    patch_size=2,
    scale_factor_spatial=16,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)


def _wan(transformer_kw, vae_kw, config_file, flow_shift, expand_timesteps=False):
    def build():
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        from leapalign_fast.models.wan import WanComponents, euler_scheduler

        components = WanComponents(
            WanTransformer3DModel(**transformer_kw),
            AutoencoderKLWan(**vae_kw).eval(),
            None,
            euler_scheduler({"flow_shift": flow_shift}),
        )
        components.expand_timesteps = expand_timesteps
        return components

    d = transformer_kw.get("text_dim", 4096)
    return "wan", config_file, build, lambda msl: {"embeds": (msl, d), "neg_embeds": (msl, d)}


# Random-weight models built without a weights directory: (family, config file, build(), cached tensor shapes).
# The `random-tiny*` ones are the CPU stand-ins that let the tests run the full-size code path.
RANDOM_MODELS = {
    "flux-dev": _flux(FLUX_DEV, FLUX_VAE, 4096, 768),
    "sd35-medium": _sd3(SD35_MEDIUM, SD3_VAE),
    "flux2-klein-9b": _flux2(KLEIN_9B, {}),
    "qwen-image": _qwenimage({}, {}),  # the classes' defaults are Qwen-Image's
    "z-image-turbo": _zimage({}, FLUX_VAE),  # the class defaults are Z-Image-Turbo's (3840 wide, 30 + 2 + 2 blocks)
    "wan2.1-1.3b": _wan(WAN21_1_3B, {}, "wan21_1.3b_leapalign.toml", 3.0),
    "wan2.2-5b": _wan(WAN22_5B, WAN22_VAE, "wan22_5b_leapalign.toml", 5.0, expand_timesteps=True),
    "random-tiny": _flux(
        dict(
            FLUX_DEV,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8),
        ),
        dict(FLUX_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8),
        32,
        32,
    ),
    "random-tiny-sd3": _sd3(
        dict(
            SD35_MEDIUM,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            pos_embed_max_size=32,
            dual_attention_layers=(0,),
        ),
        dict(SD3_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8),
    ),
    "random-tiny-qwen": _qwenimage(
        dict(
            num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)
        ),
        dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    ),
    "random-tiny-flux2": _flux2(
        dict(
            KLEIN_9B,
            in_channels=32,
            num_layers=1,
            num_single_layers=1,
            num_attention_heads=2,
            attention_head_dim=16,
            joint_attention_dim=48,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
        ),
        dict(
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=8,
            norm_num_groups=8,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
    ),
    "random-tiny-zimage": _zimage(
        dict(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6]),
        dict(FLUX_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8),
    ),
    "random-tiny-wan": _wan(
        dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32),
        dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
        "wan21_1.3b_leapalign.toml",
        3.0,
    ),
}
RANDOM_RESOLUTIONS = {
    "flux-dev": [512, 1024],
    "sd35-medium": [512],
    "flux2-klein-9b": [512],
    "qwen-image": [512],
    "z-image-turbo": [512],
    "wan2.1-1.3b": ["480x832"],  # with the config's num_frames (33; --set num_frames=81)
    "wan2.2-5b": ["480x832"],
}  # others: 64


class RandomEmbeds:
    """Random cached prompt tensors of the shapes a backbone's velocity reads (`tensors` as PromptCache)."""

    def __init__(self, prompts, shapes: dict, dtype):
        import torch

        g, n = torch.Generator().manual_seed(0), len(prompts)
        self.prompts = list(prompts)
        self.data = {
            k: (
                torch.ones(n, *s, dtype=torch.long) if k.endswith("mask") else torch.randn(n, *s, generator=g).to(dtype)
            )
            for k, s in shapes.items()
        }

    def tensors(self, idx, names):
        return {k: self.data[k][idx] for k in names}


@contextlib.contextmanager
def random_weights(kind: str, device: str):
    """Make `train.Trainer` build the `kind` components with random weights directly in the model dtype on
    `device` (no float32 copy first, nothing left in the allocator) and random prompt embeddings."""
    import torch

    from leapalign_fast import build
    from leapalign_fast.models.backbone import DTYPES

    _, _, build_components, shapes = RANDOM_MODELS[kind]

    def load_components(cfg, backbone, need_text=True, empty_transformer=False):  # random weights: built whole
        dtype, previous = DTYPES[cfg.model.dtype], torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return build_components()
        finally:
            torch.set_default_dtype(previous)

    def prompt_embeddings(cfg, backbone, components, prompts, device=None, verify=True):  # nothing to verify
        return RandomEmbeds(prompts, shapes(cfg.model.max_sequence_length), DTYPES[cfg.model.dtype])

    saved = build.load_components, build.prompt_embeddings
    build.load_components, build.prompt_embeddings = load_components, prompt_embeddings
    try:
        yield
    finally:
        build.load_components, build.prompt_embeddings = saved

"""The Wan text-to-video backbone (models/wan.py) and the per-frame video rewards (rewards/video.py), on tiny random
components of the real diffusers/transformers classes (WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel):
our sampler equals WanPipeline's (non-square, several frame counts), our prompt cache its encode_prompt, the
exported LoRA loads in WanPipeline and reproduces our samples, every method trains, LeapAlign resumes bit-exactly,
and a per-frame reward on K frames is the differentiable mean of the frames' scores."""

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from test_crash_safety import BASE, _assert_same_run

from leapalign_fast.blocks import repeated_blocks
from leapalign_fast.config import TinyFluxConfig, load_config
from leapalign_fast.errors import UserError
from leapalign_fast.methods import METHODS
from leapalign_fast.models.backbone import family_of, get_backbone
from leapalign_fast.models.common import unwrap
from leapalign_fast.rewards import build_reward
from leapalign_fast.rewards.video import frame_indices, temporal_penalty, video_reward
from leapalign_fast.sampler import sample_trajectory
from leapalign_fast.train import train

N, G = 4, 3.5
PROMPTS = ["a red square", "two blue circles"]
VIDEO = ["model.family=wan", "num_frames=5", "height=32", "width=48"]  # 2 latent frames, non-square


@pytest.fixture(scope="module")
def wan():
    backbone = get_backbone("wan")
    return backbone, backbone.build_tiny(TinyFluxConfig(), 0)


def _pipeline(comps, text=True):
    pipe = WanPipeline(
        tokenizer=comps.text.tokenizer if text else None,
        text_encoder=comps.text.text_encoder if text else None,
        vae=comps.vae,
        transformer=comps.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(backbone, comps, transformer, cond, noise, geom):
    with torch.no_grad():
        v = backbone.velocity(transformer, cond, geom, G)
        return sample_trajectory(v, noise, backbone.schedule(comps, N, geom)).x0


def _theirs(pipe, cond, noise, geom, num_frames):
    """WanPipeline's latents from our noise (unpacked to its layout), packed back to ours."""
    from leapalign_fast.models.wan import pack, unpack

    with torch.no_grad():
        z = pipe(
            prompt_embeds=cond["embeds"],
            negative_prompt_embeds=cond["neg_embeds"],
            latents=unpack(noise, geom),
            height=geom.h * 8,
            width=geom.w * 8,
            num_frames=num_frames,
            num_inference_steps=N,
            guidance_scale=G,
            output_type="latent",
            return_dict=False,
            max_sequence_length=cond["embeds"].shape[1],
        )[0]
    return pack(z)


def test_prompt_cache_equals_pipeline_encode_prompt(wan):
    backbone, comps = wan
    ours = backbone.encode_prompts(comps.text, PROMPTS)
    with torch.no_grad():
        e, ne = _pipeline(comps).encode_prompt(PROMPTS, max_sequence_length=comps.text.max_sequence_length)
    assert set(ours) == {"embeds", "neg_embeds"} == set(backbone.conditioning)
    assert ours["embeds"].shape == e.shape == (2, comps.text.max_sequence_length, 32)
    torch.testing.assert_close(ours["embeds"], e, rtol=0, atol=0)
    torch.testing.assert_close(ours["neg_embeds"], ne, rtol=0, atol=0)
    assert (ours["embeds"][:, -1] == 0).all()  # zeroed past the prompt's tokens, as the pipeline


@pytest.mark.parametrize("size, num_frames", [((64, 64), 1), ((32, 48), 5), ((48, 32), 9)])
def test_sampler_equals_wan_pipeline(wan, size, num_frames):
    backbone, comps = wan
    geom = backbone.layout(comps, size, num_frames)
    assert geom.frames == (num_frames - 1) // 4 + 1 and geom.tokens == geom.frames * (geom.h // 2) * (geom.w // 2)
    cond = backbone.encode_prompts(comps.text, PROMPTS)
    noise = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0))
    ours = _ours(backbone, comps, comps.transformer, cond, noise, geom)
    theirs = _theirs(_pipeline(comps, text=False), cond, noise, geom, num_frames)
    print(f"wan {size} x {num_frames} frames: sampler max|diff| vs WanPipeline {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # the bench's reference (Backbone.pipeline_sample) is the same pipeline
    ref = backbone.pipeline_sample(comps, cond, noise, geom, N, G)
    torch.testing.assert_close(ref, theirs, rtol=0, atol=0)
    with torch.no_grad():
        video = backbone.decode(comps.vae, ours, geom)
    assert video.shape == (2, num_frames, 3, *size) and 0 <= video.min() and video.max() <= 1


def test_decode_equals_the_pipeline_video(wan):
    """Our decode (un-normalise, VAE, [0, 1], frames first) is WanPipeline's output_type='pt' video."""
    backbone, comps = wan
    geom = backbone.layout(comps, (32, 48), 5)
    cond = backbone.encode_prompts(comps.text, PROMPTS[:1])
    noise = torch.randn(*geom.noise_shape(1), generator=torch.Generator().manual_seed(2))
    from leapalign_fast.models.wan import unpack

    with torch.no_grad():
        ours = backbone.decode(comps.vae, _ours(backbone, comps, comps.transformer, cond, noise, geom), geom)
        theirs = _pipeline(comps, text=False)(
            prompt_embeds=cond["embeds"],
            negative_prompt_embeds=cond["neg_embeds"],
            latents=unpack(noise, geom),
            height=32,
            width=48,
            num_frames=5,
            num_inference_steps=N,
            guidance_scale=G,
            output_type="pt",
            return_dict=False,
        )[0]
    assert theirs.shape == ours.shape == (1, 5, 3, 32, 48)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_geometry_refuses_what_the_vae_cannot_take_in_one_line(wan):
    backbone, comps = wan
    with pytest.raises(UserError, match=r"num_frames=6: .*1 \+ a multiple of 4 frames; use e\.g\. 5"):
        backbone.layout(comps, 64, 6)
    with pytest.raises(UserError, match=r"resolution 40 is not divisible by 16"):
        backbone.layout(comps, 40, 5)
    with pytest.raises(UserError, match=r"num_frames=5: model.family flux makes images; .*video family \(.*wan"):
        get_backbone("flux").layout(None, 64, 5)


def test_wan_is_found_by_model_index_and_its_blocks_are_the_fsdp_units(wan, tmp_path):
    backbone, comps = wan
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    assert family_of(str(tmp_path), "") == "wan"
    assert repeated_blocks(comps.transformer) == list(comps.transformer.blocks)


def _colour_video(prompts, frames=5):
    torch.manual_seed(0)
    return torch.rand(len(prompts), frames, 3, 16, 24, requires_grad=True)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 9])
def test_per_frame_reward_on_k_frames_is_the_differentiable_mean_of_frame_scores(k):
    image_reward = build_reward("colour")
    video = _colour_video(PROMPTS)
    got = video_reward(image_reward, frames=k)(video, PROMPTS)
    idx = frame_indices(5, k)
    assert idx == {0: [0, 1, 2, 3, 4], 1: [2], 2: [0, 4], 3: [0, 2, 4], 5: [0, 1, 2, 3, 4], 9: [0, 1, 2, 3, 4]}[k]
    want = torch.stack([image_reward(video[:, i], PROMPTS) for i in idx], 1).mean(1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    (grad,) = torch.autograd.grad(got.sum(), video)
    scored = grad.abs().flatten(2).sum(2) > 0  # (B, T): which frames receive a gradient
    assert scored.tolist() == [[i in idx for i in range(5)]] * 2


def test_temporal_term_and_the_toy_video_reward():
    video = _colour_video(PROMPTS)
    base = video_reward(build_reward("colour"))(video, PROMPTS)
    with_penalty = video_reward(build_reward("colour"), temporal_weight=0.5)(video, PROMPTS)
    want = (video[:, 1:] - video[:, :-1]).abs().flatten(1).mean(1)
    torch.testing.assert_close(temporal_penalty(video), want)
    torch.testing.assert_close(with_penalty, base - 0.5 * want)
    still = video[:, :1].expand(-1, 5, -1, -1, -1)
    assert temporal_penalty(still).abs().max() == 0
    fade = video_reward(build_reward("fade"))
    ramp = torch.linspace(0, 1, 5).view(1, 5, 1, 1, 1).expand(2, 5, 3, 4, 4)
    torch.testing.assert_close(fade(ramp, PROMPTS), torch.ones(2))
    torch.testing.assert_close(fade(ramp.flip(1), PROMPTS), -torch.ones(2))
    images = torch.rand(2, 3, 8, 8)  # images pass to the image reward unchanged
    torch.testing.assert_close(
        video_reward(build_reward("colour"), 2, 0.5)(images, PROMPTS), build_reward("colour")(images, PROMPTS)
    )


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_leapalign_trains_wan_with_a_per_frame_reward_resumes_and_lora_loads_in_wan_pipeline(wan, tmp_path):
    backbone, comps = wan
    args = [
        *VIDEO,
        "lora.enabled=true",
        "lora.rank=4",
        "lr=5e-2",
        "checkpoint_every=2",
        f"guidance={G}",
        "reward.frames=2",
        "reward.temporal_weight=0.1",
        *BASE,
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    res = train(load_config(None, [f"output_dir={straight}", "max_steps=4", *args]))
    train(load_config(None, [f"output_dir={split}", "max_steps=2", *args]))
    train(load_config(None, [f"output_dir={split}", "max_steps=4", "resume=true", *args]))
    _assert_same_run(straight, split, 4)
    assert res.trainer.backbone.name == "wan" and res.trainer.geometry.frames == 2
    assert all(math.isfinite(r["loss"]) for r in _rows(straight))

    trained = unwrap(res.trainer.transformer).cpu()
    pipe = _pipeline(backbone.build_tiny(TinyFluxConfig(), 0), text=False)  # a fresh base model, same seed
    pipe.load_lora_weights(straight / "lora", adapter_name="leap")
    geom = backbone.layout(comps, (32, 48), 5)
    cond = backbone.encode_prompts(comps.text, PROMPTS[:1])
    noise = torch.randn(*geom.noise_shape(1), generator=torch.Generator().manual_seed(1))
    ours = _ours(backbone, comps, trained, cond, noise, geom)
    theirs = _theirs(pipe, cond, noise, geom, 5)
    print(f"wan LoRA max|diff| vs WanPipeline.load_lora_weights: {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - _ours(backbone, comps, comps.transformer, cond, noise, geom)).abs().max() > 1e-4


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_two_steps_on_wan(method, tmp_path):
    train(
        load_config(
            None,
            [
                f"output_dir={tmp_path}",
                *VIDEO,
                f"method.name={method}",
                "max_steps=2",
                f"guidance={G}",
                "model.uncond_grad=false",
                "reward.frames=2",
                *BASE,
            ],
        )
    )
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


def test_meta_device_count_equals_the_count_of_a_real_run():
    """bench/meta_memory.py's full-size estimate counts saved tensors on the meta device: on the toy Wan the count
    is the one of the same step run for real on CPU (velocity with CFG, LoRA, checkpointing off and on; decode)."""
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parent.parent))
    from bench import meta_memory
    from bench.random_models import RANDOM_MODELS

    backbone = get_backbone("wan")
    counts = {}
    for where in ("meta", "cpu"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(where):
                comps = RANDOM_MODELS["random-tiny-wan"][2]()
        finally:
            torch.set_default_dtype(torch.float32)
        tr = comps.transformer
        meta_memory.add_lora(tr, backbone.lora_targets, 4)
        geom = backbone.layout(comps, (32, 48), 5)
        cond = {k: torch.zeros(1, 8, 32, device=where, dtype=torch.bfloat16) for k in backbone.conditioning}
        x = torch.zeros(*geom.noise_shape(1), device=where, dtype=torch.bfloat16)
        t = torch.full((1,), 0.5, device=where)
        v = backbone.velocity(tr, cond, geom, 5.0)
        for ck in (False, True):
            tr.enable_gradient_checkpointing() if ck else tr.disable_gradient_checkpointing()
            counts[where, ck] = meta_memory.saved_bytes(lambda: v(x.requires_grad_(True), t), [tr])
        z = x.clone().requires_grad_(True)
        counts[where, "decode"] = meta_memory.saved_bytes(lambda: backbone.decode(comps.vae, z, geom), [comps.vae])
    assert counts["meta", False] == counts["cpu", False] > counts["meta", True] == counts["cpu", True] > 0
    assert counts["meta", "decode"] == counts["cpu", "decode"] > 0


def _tiny_wan22(wan):
    """Tiny Wan 2.2 TI2V-style components: the patchified residual AutoencoderKLWan (16x: 8x + 2x2 patches),
    per-token timesteps (`expand_timesteps`), shift 5."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from leapalign_fast.models.wan import WanComponents, euler_scheduler

    backbone, base = wan
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
    )
    transformer = WanTransformer3DModel.from_config({**transformer.config, "num_layers": 2})
    vae = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=8,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        latents_mean=[0.1] * 8,
        latents_std=[2.0] * 8,
    ).eval()
    comps = WanComponents(transformer, vae, base.text, euler_scheduler({"flow_shift": 5.0}))
    comps.expand_timesteps = True
    return backbone, comps


def test_wan22_ti2v_samples_and_decodes_as_the_pipeline(wan):
    backbone, comps = _tiny_wan22(wan)
    geom = backbone.layout(comps, (32, 64), 5)
    assert (geom.h, geom.w, geom.frames, geom.tokens, geom.channels) == (2, 4, 2, 4, 32)
    with pytest.raises(UserError, match=r"image width 80 is not divisible by 32"):
        backbone.layout(comps, (64, 80), 5)
    cond = backbone.encode_prompts(comps.text, PROMPTS[:1])
    noise = torch.randn(*geom.noise_shape(1), generator=torch.Generator().manual_seed(0))
    ours = _ours(backbone, comps, comps.transformer, cond, noise, geom)
    theirs = backbone.pipeline_sample(comps, cond, noise, geom, N, G)  # WanPipeline(expand_timesteps=True)
    print(f"wan 2.2 TI2V-style sampler max|diff| vs WanPipeline: {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    comps.expand_timesteps = False  # one timestep per sample: not the pipeline's computation
    assert (_ours(backbone, comps, comps.transformer, cond, noise, geom) - theirs).abs().max() > 0
    with torch.no_grad():
        video = backbone.decode(comps.vae, ours, geom)
    assert video.shape == (1, 5, 3, 32, 64)


def test_a_wan_directory_loads_with_its_unipc_scheduler_config(wan, tmp_path):
    """A WanPipeline.save_pretrained directory (UniPC scheduler with flow_shift, as Wan's repositories ship it,
    expand_timesteps in model_index.json) loads: its shift, its per-token timesteps, its tokenizer."""
    from diffusers import UniPCMultistepScheduler

    from leapalign_fast.models.wan import load_wan

    backbone, comps = _tiny_wan22(wan)
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    WanPipeline(
        tokenizer=comps.text.tokenizer,
        text_encoder=comps.text.text_encoder,
        vae=comps.vae,
        transformer=comps.transformer,
        scheduler=unipc,
        expand_timesteps=True,
    ).save_pretrained(tmp_path)
    loaded = load_wan(tmp_path, torch.float32, max_sequence_length=32)
    assert loaded.expand_timesteps and loaded.scheduler.config.shift == 5.0
    assert family_of(str(tmp_path), "") == "wan"
    cond = backbone.encode_prompts(loaded.text, PROMPTS)
    torch.testing.assert_close(cond["embeds"], backbone.encode_prompts(comps.text, PROMPTS)["embeds"], rtol=0, atol=0)
    geom = backbone.layout(loaded, (64, 64), 5)
    sigmas = backbone.schedule(loaded, N, geom)
    want = FlowMatchEulerDiscreteScheduler(shift=5.0)
    want.set_timesteps(N)
    torch.testing.assert_close(sigmas, want.sigmas.float(), rtol=0, atol=0)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    with pytest.raises(UserError, match="two-transformer Wan 2.2"):
        load_wan(tmp_path, torch.float32)


WAN_CONFIGS = ["wan21_1.3b_leapalign", "wan22_5b_leapalign"]


@pytest.mark.parametrize("name", WAN_CONFIGS)
def test_wan_configs_hold_their_settings(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / f"{name}.toml")
    assert (cfg.model.family, cfg.guidance, cfg.height, cfg.width, cfg.num_frames) == ("wan", 5.0, 480, 832, 33)
    assert (cfg.num_steps, cfg.lr, cfg.ema_decay, cfg.mixed_precision, cfg.model.dtype) == (
        20,
        1e-5,
        0.995,
        "bf16",
        "bfloat16",
    )
    assert (
        cfg.lora.enabled and cfg.lora.rank == 64 and cfg.lora.target_modules == list(get_backbone("wan").lora_targets)
    )
    assert (cfg.method.name, cfg.method.lam, cfg.reward.name, cfg.reward.frames) == ("leapalign", 0.55, "hpsv2.1", 4)
    assert cfg.model.gradient_checkpointing and cfg.model.max_sequence_length == 512


@pytest.mark.slow
@pytest.mark.parametrize("name", WAN_CONFIGS)
def test_wan_configs_train_two_steps_on_the_tiny_build_every_adapter_weight_trained(name, tmp_path):
    """Each shipped Wan config, its model swapped for the tiny random Wan (a 5-frame 32x48 clip, colour reward on
    2 frames), trains two steps that change every LoRA weight (gradient checkpointing, checkpointed decode, CFG on
    both branches as shipped)."""
    from pathlib import Path

    from safetensors.torch import load_file
    from test_backbones import TINY_RUN

    cfg = load_config(
        Path(__file__).resolve().parent.parent / "configs" / f"{name}.toml",
        [f"output_dir={tmp_path}", *TINY_RUN, "num_frames=5", "height=32", "width=48", "reward.frames=2", "lr=1e-2"],
    )
    assert cfg.lora.enabled and cfg.model.gradient_checkpointing and cfg.model.checkpoint_decode
    train(cfg)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    trained = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "trained.safetensors"))
    tiny = get_backbone("wan").build_tiny(cfg.model.tiny, cfg.seed).transformer
    from leapalign_fast.build import add_trainable

    add_trainable(tiny, cfg, get_backbone("wan"))
    start = {n: p.detach() for n, p in tiny.named_parameters() if p.requires_grad}
    assert set(trained) == set(start) and len(start) == 2 * 10 * 2  # A and B of 10 targets in 2 blocks
    assert all(not torch.equal(trained[n], start[n]) for n in start)  # every adapter weight moved


def test_checkpointed_decode_recomputes_one_latent_frame_at_a_time_with_the_same_values_and_gradients(wan):
    """With model.checkpoint_decode the Wan decode recomputes each latent frame's decoder call in the backward
    (AutoencoderKLWan has no checkpointing of its own: the whole decode was recomputed at once); its video and
    its gradient are the plain decode's."""
    from leapalign_fast.recompute import checkpointed_decode_reward

    backbone, comps = wan
    geom = backbone.layout(comps, (32, 48), 9)  # 3 latent frames
    x = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0))
    weight = torch.rand(2, 9, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    calls = []
    hook = comps.vae.decoder.register_forward_pre_hook(  # a pre-hook: a recompute stops early, before the end
        lambda module, args, kwargs: calls.append(bool(kwargs.get("first_chunk"))), with_kwargs=True
    )
    results = {}
    try:
        for on in (False, True):
            decode, _ = checkpointed_decode_reward(comps.vae, lambda z: backbone.decode(comps.vae, z, geom), None, on)
            z = x.clone().requires_grad_(True)
            calls.clear()
            video = decode(z)
            (grad,) = torch.autograd.grad((video * weight).sum(), z)
            results[on] = video.detach(), grad, list(calls)
    finally:
        hook.remove()
        checkpointed_decode_reward(comps.vae, None, None, False)
    assert results[False][2] == [True, False, False]  # one decoder call per latent frame, first chunk first
    # the forward, then each frame recomputed in the backward, last frame first: one frame's graph at a time (the
    # whole-decode recompute re-ran frames 0, 1, 2 in order, holding all three graphs for their backward)
    assert results[True][2] == [True, False, False, False, False, True]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # a no-grad decode (grids, evaluation) is the pipeline's plain one
        torch.testing.assert_close(backbone.decode(comps.vae, x, geom), results[False][0], rtol=0, atol=0)


@pytest.mark.slow
def test_wan_full_fine_tune_under_fsdp2_trains_like_the_unsharded_trainer(tmp_path, capsys):
    """A full fine-tune with fsdp = true (one rank, in this process): FSDP2 shards per WanTransformerBlock
    (blocks.repeated_blocks: 2 blocks + the root) and trains as fsdp = false does (losses, consolidated EMA)."""
    from safetensors.torch import load_file

    from leapalign_fast.dist_checkpoint import consolidate

    common = [*VIDEO, "max_steps=2", "checkpoint_every=2", "reward.frames=2", *BASE]
    train(load_config(None, [f"output_dir={tmp_path / 'plain'}", *common]))
    train(load_config(None, [f"output_dir={tmp_path / 'fsdp'}", "fsdp=true", *common]))
    assert "FSDP2 over 1 rank(s): 2 blocks + root" in capsys.readouterr().out
    for a, b in zip(_rows(tmp_path / "plain"), _rows(tmp_path / "fsdp")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    want = load_file(str(tmp_path / "plain" / "checkpoints" / "step_00000002" / "ema.safetensors"))
    got = consolidate(tmp_path / "fsdp" / "checkpoints" / "step_00000002", "ema")
    assert want.keys() == got.keys() and len(want) == len(
        list(get_backbone("wan").build_tiny(TinyFluxConfig(), 0).transformer.parameters())
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_eval_scores_wan_videos_per_frame_and_grids_a_row_of_frames_per_video(tmp_path):
    from PIL import Image

    from leapalign_fast.evaluate import evaluate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green star\n")
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", *VIDEO, "model.max_sequence_length=32"])
    res = evaluate(cfg, str(prompts), ["colour", "fade"], which="base", num_steps=2, batch_size=2, out=tmp_path / "ev")
    assert res["scores"]["colour"]["n"] == 3 and all(0 <= s <= 1 for s in res["per_prompt"]["colour"])
    assert all(-1 <= s <= 1 for s in res["per_prompt"]["fade"]) and len(set(res["per_prompt"]["fade"])) == 3
    grids = sorted((tmp_path / "ev").glob("grid_*.png"))
    assert [Image.open(g).size for g in grids] == [(5 * 48, 2 * 32), (5 * 48, 32)]  # a row of 5 frames per video


def test_num_frames_on_an_image_family_fails_before_the_model_loads(tmp_path, monkeypatch):
    from leapalign_fast import build

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(build, "load_components", no_load)
    with pytest.raises(UserError, match=r"num_frames=5: model.family sd3 makes images; set num_frames = 1"):
        train(load_config(None, [f"output_dir={tmp_path}", "model.family=sd3", "num_frames=5", *BASE]))


def test_the_memory_preflight_counts_every_decoded_frame_unless_the_decode_is_recomputed(wan):
    from leapalign_fast.preflight import step_bytes

    backbone, comps = wan

    def need(frames, ck):
        cfg = load_config(None, [*VIDEO, f"num_frames={frames}", f"model.checkpoint_decode={str(ck).lower()}"])
        return step_bytes(cfg, backbone, comps, backbone.layout(comps, cfg.image_size, frames))

    decode = 32 * 48 * 4 * comps.vae.config.base_dim * 3 * 4  # 4 more frames x the decoder's width, float32
    assert need(9, False) - need(5, False) >= decode  # (and the 1 more latent frame's tokens)
    assert need(9, True) - need(5, True) < decode


def test_bf16_samples_are_wan_pipelines_bit_for_bit():
    """In bf16 (the configs' dtype) our trajectory is WanPipeline's bit for bit: the pipeline keeps float32 latents
    only until its first scheduler step casts them to the model dtype, and the Euler step is the scheduler's."""
    backbone = get_backbone("wan")
    comps = backbone.build_tiny(TinyFluxConfig(), 0)
    comps.transformer.to(torch.bfloat16)
    comps.vae.to(torch.bfloat16)
    cond = {k: v.to(torch.bfloat16) for k, v in backbone.encode_prompts(comps.text, PROMPTS).items()}
    geom = backbone.layout(comps, (32, 48), 5)
    noise = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        v = backbone.velocity(comps.transformer, cond, geom, 5.0)
        ours = sample_trajectory(v, noise, backbone.schedule(comps, N, geom)).x0
    theirs = backbone.pipeline_sample(comps, cond, noise, geom, N, 5.0)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)

"""Backbones beside FLUX.1 behind the one interface (models/backbone.py), on tiny random components of the real
diffusers/transformers classes: our sampler equals the family's diffusers pipeline, our prompt encoding equals its
`encode_prompt`, the LeapAlign gradient identity holds through its velocity, LeapAlign trains and resumes
bit-exactly, and the exported LoRA loads into the pipeline and reproduces our samples."""

import pytest
import torch

from leapalign_fast.build import unwrap
from leapalign_fast.config import TinyFluxConfig, load_config
from leapalign_fast.methods.base import StepInputs, draw_two_indices
from leapalign_fast.methods.leapalign import leapalign_loss
from leapalign_fast.models.backbone import backbone_for, family_of, get_backbone
from leapalign_fast.sampler import sample_trajectory
from leapalign_fast.train import train
from test_crash_safety import BASE, _assert_same_run
from test_leapalign import _decode, _oracle_loss, _reward

RES, N, G = 64, 4, 3.5
PROMPTS = ["a red square", "two blue circles"]


@pytest.fixture(scope="module")
def sd3():
    backbone = get_backbone("sd3")
    return backbone, backbone.build_tiny(TinyFluxConfig(), 0)


def _sd3_pipeline(comps):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    t = comps.text
    pipe = StableDiffusion3Pipeline(
        transformer=comps.transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler.config),
        vae=comps.vae, text_encoder=t.text_encoder, tokenizer=t.tokenizer, text_encoder_2=t.text_encoder_2,
        tokenizer_2=t.tokenizer_2, text_encoder_3=t.text_encoder_3, tokenizer_3=t.tokenizer_3,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(backbone, comps, transformer, cond, noise):
    geom = backbone.geometry(comps, RES)
    with torch.no_grad():
        v = backbone.velocity(transformer, cond, geom, G)
        return sample_trajectory(v, noise, backbone.schedule(comps, N, geom)).x0


def _theirs(pipe, cond, noise, geom):
    from leapalign_fast.models.flux import pack_latents, unpack_latents

    with torch.no_grad():
        z = pipe(prompt_embeds=cond["embeds"], pooled_prompt_embeds=cond["pooled"],
                 negative_prompt_embeds=cond["neg_embeds"], negative_pooled_prompt_embeds=cond["neg_pooled"],
                 latents=unpack_latents(noise, geom.h, geom.w), height=RES, width=RES, num_inference_steps=N,
                 guidance_scale=G, output_type="latent", return_dict=False)[0]  # fmt: skip
    return pack_latents(z)


def test_sd3_prompt_encoding_equals_pipeline_encode_prompt(sd3):
    backbone, comps = sd3
    ours = backbone.encode_prompts(comps.text, PROMPTS)
    with torch.no_grad():
        e, ne, p, np_ = _sd3_pipeline(comps).encode_prompt(PROMPTS, None, None, max_sequence_length=32)
    for name, want in (("embeds", e), ("neg_embeds", ne), ("pooled", p), ("neg_pooled", np_)):
        assert ours[name].shape == want.shape, name
        torch.testing.assert_close(ours[name], want, rtol=0, atol=0)


def test_sd3_sampler_reproduces_pipeline(sd3):
    backbone, comps = sd3
    geom = backbone.geometry(comps, RES)
    cond = backbone.encode_prompts(comps.text, PROMPTS)
    noise = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0))
    ours, theirs = _ours(backbone, comps, comps.transformer, cond, noise), _theirs(_sd3_pipeline(comps), cond, noise, geom)
    assert ours.shape == theirs.shape == (2, 16, 64)
    print(f"sd3 sampler max|diff| vs StableDiffusion3Pipeline: {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("uncond_grad", [True, False])
def test_sd3_leapalign_gradient_matches_oracle(sd3, uncond_grad):
    backbone, comps = sd3
    tr = comps.transformer
    params = list(tr.parameters())
    geom = backbone.geometry(comps, 32)
    g = torch.Generator().manual_seed(0)
    cond = {k: v.float() for k, v in backbone.encode_prompts(comps.text, PROMPTS).items()}
    velocity = backbone.velocity(tr, cond, geom, G, uncond_grad=uncond_grad)
    noise = torch.randn(*geom.noise_shape(2), generator=g)
    sigmas = backbone.schedule(comps, 5, geom)
    out = leapalign_loss(StepInputs(velocity, noise, sigmas, _decode, _reward, PROMPTS, torch.Generator().manual_seed(3)),
                         0.3, 0.1, 2.0, (0, 5))  # fmt: skip
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    a, b = draw_two_indices(0, 5, torch.Generator().manual_seed(3))
    want_loss, _ = _oracle_loss(velocity, noise, sigmas, a, b, 0.3, 0.1, 2.0)
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    assert any(w is not None and w.abs().sum() > 0 for w in want)
    for gg, w in zip(got, want):
        if w is None:
            assert gg is None
        else:
            torch.testing.assert_close(gg, w, rtol=1e-4, atol=1e-6)


def test_sd3_leapalign_trains_resumes_bit_exactly_and_lora_loads_in_pipeline(sd3, tmp_path):
    backbone, comps = sd3
    args = ["model.family=sd3", "lora.enabled=true", "lora.rank=4", "lr=5e-2", "checkpoint_every=2", "guidance=3.5",
            "method.name=leapalign", *BASE]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    res = train(load_config(None, [f"output_dir={straight}", "max_steps=4", *args]))
    train(load_config(None, [f"output_dir={split}", "max_steps=2", *args]))
    train(load_config(None, [f"output_dir={split}", "max_steps=4", "resume=true", *args]))
    _assert_same_run(straight, split, 4)
    assert res.run.backbone.name == "sd3" and res.run.geometry.channels == 64

    trained = unwrap(res.run.transformer).cpu()
    pipe = _sd3_pipeline(backbone.build_tiny(TinyFluxConfig(), 0))  # a fresh base model, same seed
    pipe.load_lora_weights(straight / "lora", adapter_name="leap")
    geom = backbone.geometry(comps, RES)
    cond = backbone.encode_prompts(comps.text, PROMPTS[:1])
    noise = torch.randn(*geom.noise_shape(1), generator=torch.Generator().manual_seed(1))
    ours = _ours(backbone, comps, trained, cond, noise)
    theirs = _theirs(pipe, cond, noise, geom)
    print(f"sd3 LoRA max|diff| vs StableDiffusion3Pipeline.load_lora_weights: {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - _ours(backbone, comps, comps.transformer, cond, noise)).abs().max() > 1e-4


def test_family_from_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    assert family_of(str(tmp_path), "") == "sd3"
    assert family_of("tiny", "") == "flux" and family_of(str(tmp_path), "flux") == "flux"
    cfg = load_config(None, ["model.family=sd3"])
    assert backbone_for(cfg.model).pipeline == "StableDiffusion3Pipeline"


def test_sd35_medium_config_holds_the_published_settings():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "sd35_medium_leapalign.toml")
    assert (cfg.model.family, cfg.resolution, cfg.num_steps, cfg.guidance, cfg.lr) == ("sd3", 512, 25, 3.5, 1e-5)
    assert (cfg.ema_decay, cfg.max_steps, cfg.method.lam, cfg.reward.name) == (0.995, 300, 0.55, "hpsv2.1")

"""Backbones beside FLUX.1 behind the one interface (models/backbone.py), on tiny random components of the real
diffusers/transformers classes: our sampler equals the family's diffusers pipeline, our prompt encoding equals its
`encode_prompt`, the LeapAlign gradient identity holds through its velocity, LeapAlign trains and resumes
bit-exactly, and the exported LoRA loads into the pipeline and reproduces our samples."""

from pathlib import Path

import pytest
import torch
from test_crash_safety import BASE, _assert_same_run
from test_leapalign import _decode, _oracle_loss, _reward

from leapalign_fast.build import unwrap
from leapalign_fast.config import TinyFluxConfig, load_config
from leapalign_fast.methods import METHODS
from leapalign_fast.methods.base import StepInputs, draw_two_indices
from leapalign_fast.methods.leapalign import leapalign_loss
from leapalign_fast.models.backbone import backbone_for, family_of, get_backbone
from leapalign_fast.sampler import sample_trajectory
from leapalign_fast.train import train

RES, N, G = 64, 4, 3.5
PROMPTS = ["a red square", "two blue circles"]


# Per family: the diffusers pipeline over our components, its encode_prompt as our cache's tensors, and its
# sampler's latents next to ours in one layout.
def _sd3_pipeline(comps):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    t = comps.text
    return StableDiffusion3Pipeline(
        transformer=comps.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler.config),
        vae=comps.vae,
        text_encoder=t.text_encoder,
        tokenizer=t.tokenizer,
        text_encoder_2=t.text_encoder_2,
        tokenizer_2=t.tokenizer_2,
        text_encoder_3=t.text_encoder_3,
        tokenizer_3=t.tokenizer_3,
    )


def _sd3_encode(pipe, comps, prompts):
    e, ne, p, np_ = pipe.encode_prompt(prompts, None, None, max_sequence_length=comps.text.max_sequence_length)
    return {"embeds": e, "neg_embeds": ne, "pooled": p, "neg_pooled": np_}


def _sd3_sample(pipe, comps, cond, noise, geom, res=RES, steps=N, guidance=G):
    from leapalign_fast.models.common import pack_latents, unpack_latents

    z = pipe(
        prompt_embeds=cond["embeds"],
        pooled_prompt_embeds=cond["pooled"],
        negative_prompt_embeds=cond["neg_embeds"],
        negative_pooled_prompt_embeds=cond["neg_pooled"],
        latents=unpack_latents(noise, geom.h, geom.w),
        height=res,
        width=res,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
    )[0]
    return pack_latents(z)


def _flux2_pipeline(comps):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler.config),
        vae=comps.vae,
        text_encoder=comps.text.text_encoder,
        tokenizer=comps.text.tokenizer,
        transformer=comps.transformer,
        is_distilled=comps.is_distilled,
    )


def _flux2_encode(pipe, comps, prompts):
    kw = dict(max_sequence_length=comps.text.max_sequence_length, text_encoder_out_layers=comps.text.out_layers)
    return {
        "embeds": pipe.encode_prompt(prompts, **kw)[0],
        "neg_embeds": pipe.encode_prompt([""] * len(prompts), **kw)[0],
    }


def _flux2_sample(pipe, comps, cond, noise, geom, res=RES, steps=N, guidance=G):
    """The pipeline's latents are un-normalised and unpatchified: ours are compared in that layout (which also
    checks our decode's normalisation and unpatchify)."""
    z = noise.permute(0, 2, 1).reshape(noise.shape[0], geom.channels, geom.h // 2, geom.w // 2)
    return pipe(
        prompt_embeds=cond["embeds"],
        negative_prompt_embeds=cond["neg_embeds"],
        latents=z,
        height=res,
        width=res,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
        text_encoder_out_layers=comps.text.out_layers,
    )[0]


def _flux2_ours_layout(comps, x0, geom):
    from leapalign_fast.models.flux2 import vae_latents

    return vae_latents(comps.vae, x0, geom)


def _qwen_pipeline(comps):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler.config),
        vae=comps.vae,
        text_encoder=comps.text.text_encoder,
        tokenizer=comps.text.tokenizer,
        transformer=comps.transformer,
    )


def _qwen_encode(pipe, comps, prompts):
    """The pipeline pads to the batch's longest prompt (mask None when all are full); our cache pads with zeros to
    max_sequence_length: the pipeline's tensors are compared zero-padded to that length."""
    s = comps.text.max_sequence_length
    out = {}
    for key, p in (("", prompts), ("neg_", [""] * len(prompts))):
        e, m = pipe.encode_prompt(p, max_sequence_length=s)
        m = torch.ones(e.shape[:2], dtype=torch.long) if m is None else m
        out[key + "embeds"] = torch.nn.functional.pad(e, (0, 0, 0, s - e.shape[1]))
        out[key + "mask"] = torch.nn.functional.pad(m, (0, s - m.shape[1]))
    return out


def _qwen_sample(pipe, comps, cond, noise, geom, res=RES, steps=N, guidance=G):
    return pipe(
        prompt_embeds=cond["embeds"],
        prompt_embeds_mask=cond["mask"],
        negative_prompt_embeds=cond["neg_embeds"],
        negative_prompt_embeds_mask=cond["neg_mask"],
        latents=noise,
        height=res,
        width=res,
        num_inference_steps=steps,
        true_cfg_scale=guidance,
        output_type="latent",
        return_dict=False,
        max_sequence_length=comps.text.max_sequence_length,
    )[0]


def _zimage_pipeline(comps):
    from leapalign_fast.models.zimage import pipeline

    return pipeline(comps)


def _zimage_encode(pipe, comps, prompts):
    """The pipeline's per-prompt tensors (each at its own length), compared left-aligned and zero-padded to
    max_sequence_length with a mask, as our cache holds them."""
    s = comps.text.max_sequence_length
    pos, neg = pipe.encode_prompt(list(prompts), device="cpu", max_sequence_length=s)
    out = {}
    for key, rows in (("", pos), ("neg_", neg)):
        out[key + "embeds"] = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, s - len(r))) for r in rows])
        out[key + "mask"] = torch.stack([(torch.arange(s) < len(r)).long() for r in rows])
    return out


def _zimage_sample(pipe, comps, cond, noise, geom, res=RES, steps=N, guidance=G):
    from leapalign_fast.models.common import pack_latents, unpack_latents
    from leapalign_fast.models.zimage import _rows

    z = pipe(
        prompt_embeds=_rows(cond["embeds"], cond["mask"]),
        negative_prompt_embeds=_rows(cond["neg_embeds"], cond["neg_mask"]),
        latents=unpack_latents(noise, geom.h, geom.w),
        height=res,
        width=res,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
    )[0]
    return pack_latents(z)


HARNESS = {  # family: (pipeline, encode_prompt, pipeline latents, our x0 in the pipeline's latent layout)
    "sd3": (_sd3_pipeline, _sd3_encode, _sd3_sample, lambda comps, x0, geom: x0),
    "flux2": (_flux2_pipeline, _flux2_encode, _flux2_sample, _flux2_ours_layout),
    "qwenimage": (_qwen_pipeline, _qwen_encode, _qwen_sample, lambda comps, x0, geom: x0),
    "zimage": (_zimage_pipeline, _zimage_encode, _zimage_sample, lambda comps, x0, geom: x0),
}
FAMILIES = list(HARNESS)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    backbone = get_backbone(request.param)
    return backbone, backbone.build_tiny(TinyFluxConfig(), 0)


def _pipeline(backbone, comps):
    pipe = HARNESS[backbone.name][0](comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(backbone, comps, transformer, cond, noise):
    geom = backbone.geometry(comps, RES)
    with torch.no_grad():
        v = backbone.velocity(transformer, cond, geom, G)
        x0 = sample_trajectory(v, noise, backbone.schedule(comps, N, geom)).x0
        return HARNESS[backbone.name][3](comps, x0, geom)


def _theirs(backbone, pipe, comps, cond, noise):
    with torch.no_grad():
        return HARNESS[backbone.name][2](pipe, comps, cond, noise, backbone.geometry(comps, RES))


def test_prompt_encoding_equals_pipeline_encode_prompt(family):
    backbone, comps = family
    ours = backbone.encode_prompts(comps.text, PROMPTS)
    with torch.no_grad():
        want = HARNESS[backbone.name][1](_pipeline(backbone, comps), comps, PROMPTS)
    assert set(ours) == set(want) and set(backbone.conditioning) <= set(ours)
    for name, w in want.items():
        assert ours[name].shape == w.shape, name
        torch.testing.assert_close(ours[name], w, rtol=0, atol=0)


def test_sampler_reproduces_pipeline(family):
    backbone, comps = family
    geom = backbone.geometry(comps, RES)
    cond = backbone.encode_prompts(comps.text, PROMPTS)
    noise = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0))
    ours = _ours(backbone, comps, comps.transformer, cond, noise)
    theirs = _theirs(backbone, _pipeline(backbone, comps), comps, cond, noise)
    assert ours.shape == theirs.shape
    print(f"{backbone.name} sampler max|diff| vs {backbone.pipeline}: {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_resolution_the_packing_cannot_take_is_one_line_naming_a_valid_one(family):
    from leapalign_fast.errors import UserError

    backbone, comps = family
    geom = backbone.geometry(comps, 64)
    assert geom.tokens == (geom.h // 2) * (geom.w // 2) and 64 % geom.h == 0
    with pytest.raises(UserError, match=r"resolution 65 is not divisible by \d+ .*use a multiple of \d+, e\.g\. 64"):
        backbone.geometry(comps, 65)


def test_qwenimage_padded_cache_samples_as_the_pipeline_own_encoding():
    """Our fixed-length (zero-padded, masked) prompt cache samples as the pipeline given only the prompts."""
    backbone = get_backbone("qwenimage")
    comps = backbone.build_tiny(TinyFluxConfig(), 0)
    geom = backbone.geometry(comps, RES)
    cond = backbone.encode_prompts(comps.text, PROMPTS)
    assert cond["mask"].sum(1).tolist() != [comps.text.max_sequence_length] * 2  # the padding is exercised
    noise = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0))
    ours = _ours(backbone, comps, comps.transformer, cond, noise)
    with torch.no_grad():
        theirs = _pipeline(backbone, comps)(
            prompt=PROMPTS,
            negative_prompt=[""] * 2,
            latents=noise,
            height=RES,
            width=RES,
            num_inference_steps=N,
            true_cfg_scale=G,
            output_type="latent",
            return_dict=False,
            max_sequence_length=32,
        )[0]
    print(f"qwenimage padded cache vs the pipeline's own encoding, max|diff|: {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("uncond_grad", [True, False])
def test_leapalign_gradient_matches_oracle(family, uncond_grad):
    backbone, comps = family
    tr = comps.transformer
    params = list(tr.parameters())
    geom = backbone.geometry(comps, 32)
    cond = {k: v.float() for k, v in backbone.encode_prompts(comps.text, PROMPTS).items() if k in backbone.conditioning}
    velocity = backbone.velocity(tr, cond, geom, G, uncond_grad=uncond_grad)
    noise = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0))
    sigmas = backbone.schedule(comps, 5, geom)
    out = leapalign_loss(
        StepInputs(velocity, noise, sigmas, _decode, _reward, PROMPTS, torch.Generator().manual_seed(3)),
        0.3,
        0.1,
        2.0,
        (0, 5),
    )
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


def test_leapalign_trains_resumes_bit_exactly_and_lora_loads_in_pipeline(family, tmp_path):
    backbone, comps = family
    args = [
        f"model.family={backbone.name}",
        "lora.enabled=true",
        "lora.rank=4",
        "lr=5e-2",
        "checkpoint_every=2",
        f"guidance={G}",
        "method.name=leapalign",
        *BASE,
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    res = train(load_config(None, [f"output_dir={straight}", "max_steps=4", *args]))
    train(load_config(None, [f"output_dir={split}", "max_steps=2", *args]))
    train(load_config(None, [f"output_dir={split}", "max_steps=4", "resume=true", *args]))
    _assert_same_run(straight, split, 4)
    assert res.trainer.backbone.name == backbone.name

    trained = unwrap(res.trainer.transformer).cpu()
    pipe = _pipeline(backbone, backbone.build_tiny(TinyFluxConfig(), 0))  # a fresh base model, same seed
    pipe.load_lora_weights(straight / "lora", adapter_name="leap")
    geom = backbone.geometry(comps, RES)
    cond = backbone.encode_prompts(comps.text, PROMPTS[:1])
    noise = torch.randn(*geom.noise_shape(1), generator=torch.Generator().manual_seed(1))
    ours = _ours(backbone, comps, trained, cond, noise)
    theirs = _theirs(backbone, pipe, comps, cond, noise)
    print(f"{backbone.name} LoRA max|diff| vs {backbone.pipeline}.load_lora_weights: {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - _ours(backbone, comps, comps.transformer, cond, noise)).abs().max() > 1e-4

    # lora_ema/: the EMA adapter, loaded by the pipeline, samples as our model with the EMA weights swapped in
    named = dict(trained.named_parameters())
    with torch.no_grad():
        for n, shadow in res.trainer.ema.shadow.items():
            named[n].copy_(shadow)
    ours_ema = _ours(backbone, comps, trained, cond, noise)
    pipe = _pipeline(backbone, backbone.build_tiny(TinyFluxConfig(), 0))
    pipe.load_lora_weights(straight / "lora_ema", adapter_name="leap_ema")
    torch.testing.assert_close(ours_ema, _theirs(backbone, pipe, comps, cond, noise), rtol=0, atol=1e-5)
    assert (ours_ema - ours).abs().max() > 1e-6  # the EMA is not the live weights


def test_family_from_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    assert family_of(str(tmp_path), "") == "sd3"
    (tmp_path / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline"}')
    assert family_of(str(tmp_path), "") == "flux2"
    (tmp_path / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    assert family_of(str(tmp_path), "") == "qwenimage"
    (tmp_path / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    assert family_of(str(tmp_path), "") == "zimage"
    assert family_of("tiny", "") == "flux" and family_of(str(tmp_path), "flux") == "flux"
    cfg = load_config(None, ["model.family=sd3"])
    assert backbone_for(cfg.model).pipeline == "StableDiffusion3Pipeline"


PUBLISHED = [("sd35_medium", "sd3", 3.5, 8), ("flux2_klein", "flux2", 4.0, 4), ("qwen_image", "qwenimage", 4.0, 4)]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("variant", ["", "_full"])
@pytest.mark.parametrize("name, family, guidance, batch", PUBLISHED)
def test_backbone_configs_hold_the_published_settings(name, family, guidance, batch, variant):
    cfg = load_config(CONFIGS / f"{name}_leapalign{variant}.toml")
    assert (cfg.model.family, cfg.guidance, cfg.batch_size) == (family, guidance, batch)
    assert (cfg.resolution, cfg.num_steps, cfg.lr, cfg.ema_decay, cfg.max_steps) == (512, 25, 1e-5, 0.995, 300)
    assert (cfg.mixed_precision, cfg.model.dtype, cfg.weight_decay, cfg.max_grad_norm) == (
        "bf16",
        "bfloat16",
        1e-4,
        1.0,
    )
    assert (cfg.method.name, cfg.method.lam, cfg.reward.name) == ("leapalign", 0.55, "hpsv2.1")
    assert cfg.lora.enabled == (variant == "")


@pytest.mark.parametrize("variant", ["", "_full"])
def test_zimage_configs_hold_turbos_published_settings(variant):
    """Z-Image-Turbo's published sampling (8 steps, no CFG), the other backbones' shared training settings."""
    cfg = load_config(CONFIGS / f"zimage_leapalign{variant}.toml")
    assert (cfg.model.family, cfg.guidance, cfg.num_steps, cfg.batch_size) == ("zimage", 0.0, 8, 4)
    assert (cfg.resolution, cfg.lr, cfg.ema_decay, cfg.max_steps, cfg.model.max_sequence_length) == (
        512,
        1e-5,
        0.995,
        300,
        512,
    )
    assert (cfg.mixed_precision, cfg.model.dtype, cfg.method.name, cfg.method.lam) == (
        "bf16",
        "bfloat16",
        "leapalign",
        0.55,
    )
    assert cfg.lora.enabled == (variant == "") and not cfg.model.cuda_graph
    if cfg.lora.enabled:
        assert cfg.lora.target_modules == list(get_backbone("zimage").lora_targets)


# The heavy settings of a shipped config swapped for a CPU-sized run of the family's tiny random build; everything
# else (full fine-tune, lr, EMA, gradient checkpointing, checkpointed decode, CFG on both branches) as shipped.
TINY_RUN = [
    "fsdp=false",  # in this process, unsharded (tests/test_full_configs.py runs them sharded on two processes)
    "model.source=tiny",
    "model.dtype=float32",
    "mixed_precision=no",
    "model.compile=none",
    "model.max_sequence_length=32",
    "resolution=64",
    "num_steps=4",
    "batch_size=2",
    "max_steps=2",
    "resume=false",
    "prompt_file=",
    "prompts=",
    "reward.name=colour",
    "reward.options={}",
    "report_to=none",
    "deterministic=true",
    "eval_prompts=['a red square']",
]


@pytest.mark.parametrize("name", [p[0] for p in PUBLISHED] + ["zimage"])
def test_full_configs_train_the_tiny_build_of_their_backbone(name, tmp_path):
    """Each full config, its model swapped for the tiny random build of its family, trains two steps that change
    every transformer weight's checkpointed copy (a full fine-tune, not LoRA)."""
    import json
    import math

    from leapalign_fast.checkpoint import read_weights

    cfg = load_config(CONFIGS / f"{name}_leapalign_full.toml", [f"output_dir={tmp_path}", *TINY_RUN])
    assert not cfg.lora.enabled and cfg.model.gradient_checkpointing and cfg.model.checkpoint_decode
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    weights = read_weights(tmp_path / "checkpoints" / "step_00000002")
    tiny = get_backbone(cfg.model.family).build_tiny(cfg.model.tiny, cfg.seed).transformer
    base = {k: v.detach() for k, v in unwrap(tiny).named_parameters()}
    assert set(weights) == set(base)  # every parameter trained, no adapter
    assert sum(not torch.equal(weights[k], base[k]) for k in base) > len(base) // 2


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_every_method_trains_on_every_backbone(name, method, tmp_path):
    import json
    import math

    train(
        load_config(
            None,
            [
                f"output_dir={tmp_path}",
                f"model.family={name}",
                f"method.name={method}",
                "max_steps=2",
                f"guidance={G}",
                "model.uncond_grad=false",
                *BASE,
            ],
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


def test_graphed_velocity_rebinds_every_family_conditioning(family):
    """CUDA-graph replays (CPU stand-in of test_fast_path) of each family's velocity: every conditioning tensor is
    copied into the graph's static buffers, so a second and third batch of prompts replay with their own values."""
    import gc

    from test_fast_path import cpu_graph

    from leapalign_fast.models.fast import GraphedVelocity

    backbone, comps = family
    if not backbone.graphable:  # Z-Image: prompt-dependent shapes, refused (test_zimage_refuses_cuda_graphs)
        pytest.skip(f"{backbone.name}: no CUDA graphs (Backbone.graphable = False)")
    tr = comps.transformer
    geom = backbone.geometry(comps, RES)
    capture, _ = cpu_graph(tr)
    g = GraphedVelocity(tr, capture=capture, device_types=("cpu",))
    prompts = [PROMPTS, ["a green star", "a cube"], ["a small yellow ring", "a big box"]]
    for seed, batch in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed)
        cond = {k: v for k, v in backbone.encode_prompts(comps.text, batch).items() if k in backbone.conditioning}
        x, t = torch.randn(*geom.noise_shape(2), generator=gen), torch.rand(2, generator=gen)
        g.bind(backbone.velocity(tr, {k: v.clone() for k, v in cond.items()}, geom, G))  # the caller drops its refs
        gc.collect()
        with torch.no_grad():
            torch.testing.assert_close(g(x, t), backbone.velocity(tr, cond, geom, G)(x, t), rtol=0, atol=0)
    assert len(g.graphs) == 1


def test_zimage_refuses_cuda_graphs(tmp_path):
    """Z-Image's transformer takes each prompt's embeddings at their own length: a captured graph would replay
    another batch's shapes, so a graphed no-grad call is one UserError line (grad-enabled calls run eagerly), and a
    run with model.cuda_graph=true is refused before anything loads."""
    from test_fast_path import cpu_graph

    from leapalign_fast.errors import UserError
    from leapalign_fast.models.fast import GraphedVelocity

    backbone = get_backbone("zimage")
    comps = backbone.build_tiny(TinyFluxConfig(), 0)
    geom = backbone.geometry(comps, RES)
    cond = backbone.encode_prompts(comps.text, PROMPTS)
    assert len(set(cond["mask"].sum(1).tolist())) == 2  # the two prompts' lengths differ
    g = GraphedVelocity(comps.transformer, capture=cpu_graph(comps.transformer)[0], device_types=("cpu",))
    g.bind(backbone.velocity(comps.transformer, cond, geom, G))
    x, t = torch.randn(*geom.noise_shape(2)), torch.rand(2)
    assert torch.isfinite(g(x, t)).all()  # grad enabled: eager
    with torch.no_grad(), pytest.raises(UserError, match=r"^model.cuda_graph=true cannot capture Z-Image.*=false$"):
        g(x, t)
    assert not g.graphs
    with pytest.raises(UserError, match=r"^model.cuda_graph=true: model.family zimage's forward .*=false$"):
        train(load_config(None, ["model.family=zimage", "model.cuda_graph=true", f"output_dir={tmp_path}", *BASE]))
    assert not (tmp_path / "prompt_cache").exists()  # refused before anything loads or is encoded


def test_load_reads_the_pipeline_directory_and_lists_missing_parts(family, tmp_path):
    """`save_pretrained` of the family's pipeline is a directory `load` reads (family from model_index.json), with
    the same velocity and prompt encoding; a missing part is named."""
    import shutil

    from leapalign_fast.errors import UserError

    backbone, comps = family
    _pipeline(backbone, comps).save_pretrained(tmp_path / "model")
    assert family_of(str(tmp_path / "model"), "") == backbone.name
    loaded = backbone.load(tmp_path / "model", torch.float32, need_text=True, max_sequence_length=32)
    a, b = backbone.encode_prompts(comps.text, PROMPTS), backbone.encode_prompts(loaded.text, PROMPTS)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    geom = backbone.geometry(comps, RES)
    cond = {k: v for k, v in a.items() if k in backbone.conditioning}
    x, t = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0)), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.velocity(loaded.transformer, cond, geom, G)(x, t),
            backbone.velocity(comps.transformer, cond, geom, G)(x, t),
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(backbone.schedule(loaded, N, geom), backbone.schedule(comps, N, geom))
    shutil.rmtree(tmp_path / "model" / "tokenizer")
    backbone.load(tmp_path / "model", torch.float32, need_text=False)  # the cache stands in for the text side
    with pytest.raises(UserError, match="tokenizer/"):
        backbone.load(tmp_path / "model", torch.float32)


def test_eval_samples_a_trained_checkpoint_of_every_family(family, tmp_path):
    """`evaluate.sample_images` goes through the interface: a trained LoRA checkpoint of each family samples
    finite images that differ from the base model's (same prompts, noise seed, steps)."""
    from leapalign_fast.evaluate import resolve_checkpoint, sample_images

    backbone, _ = family
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            f"model.family={backbone.name}",
            "lora.enabled=true",
            "lora.rank=4",
            "lr=5e-2",
            "max_steps=2",
            f"guidance={G}",
            *BASE,
        ],
    )
    train(cfg)
    images = torch.cat(
        [
            im
            for _, im in sample_images(
                cfg, PROMPTS, resolve_checkpoint(cfg, "latest"), num_steps=4, batch_size=2, seed=0
            )
        ]
    )
    base = torch.cat([im for _, im in sample_images(cfg, PROMPTS, None, num_steps=4, batch_size=2, seed=0)])
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert (images - base).abs().max() > 0  # the checkpoint's weights were used

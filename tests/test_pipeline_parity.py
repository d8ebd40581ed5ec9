"""Sampling = each family's diffusers pipeline beyond the float32 tiny defaults (issue 26): bf16 bit for bit at a
resolution where the shift matters, the schedule of the model directory's scheduler config at 512 and 1024 px (read
from the pipeline itself, without running the model), a FLUX.1-schnell directory (no guidance embedding, static
shift) and a step-wise distilled FLUX.2-Klein directory (no CFG), each written by the pipeline's `save_pretrained`.
Every check is shown to fail on the old behaviour (float32 Euler arithmetic, bf16 time, dev schedule, CFG run)."""

import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from test_backbones import HARNESS, PROMPTS

from leapalign_fast.config import TinyFluxConfig
from leapalign_fast.errors import UserError
from leapalign_fast.flow import as_batch_time, euler_step, flux_schedule
from leapalign_fast.models import common
from leapalign_fast.models.backbone import get_backbone
from leapalign_fast.sampler import sample_trajectory

N, G = 4, 3.5
BF16 = torch.bfloat16
# FLUX.1-schnell's scheduler_config.json (black-forest-labs/FLUX.1-schnell): a static shift 1.0.
SCHNELL_SCHEDULER = dict(
    shift=1.0,
    use_dynamic_shifting=False,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def _flux_pipeline(comps):
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler.config),
        vae=comps.vae,
        text_encoder=comps.text.clip,
        tokenizer=comps.text.clip_tokenizer,
        text_encoder_2=comps.text.t5,
        tokenizer_2=comps.text.t5_tokenizer,
        transformer=comps.transformer,
    )


def _flux_sample(pipe, comps, cond, noise, geom, res, steps=N, guidance=G):
    return pipe(
        prompt_embeds=cond["t5"],
        pooled_prompt_embeds=cond["pooled"],
        latents=noise,
        height=res,
        width=res,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
    )[0]


# family: (pipeline over our components, its latents from our noise, our x0 in the pipeline's latent layout)
PIPELINES = {
    "flux": (_flux_pipeline, _flux_sample, lambda comps, x0, geom: x0),
    **{name: (h[0], h[2], h[3]) for name, h in HARNESS.items()},
}


def _pipe(name, comps):
    pipe = PIPELINES[name][0](comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cond(backbone, comps, prompts, dtype):
    cond = backbone.encode_prompts(comps.text, prompts)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}


@torch.no_grad()
def _ours(backbone, comps, cond, noise, res, steps=N, guidance=G, step=None):
    """Our eval path's x0 (the sampler with the backbone's schedule and velocity) in the pipeline's layout;
    `step` replaces the sampler's Euler step (the old float32 arithmetic)."""
    geom = backbone.geometry(comps, res)
    v = backbone.velocity(comps.transformer, {k: cond[k] for k in backbone.conditioning}, geom, guidance)
    sigmas = backbone.schedule(comps, steps, geom)
    if step is None:
        x0 = sample_trajectory(v, noise, sigmas).x0
    else:
        x0 = noise
        for i in range(steps):
            x0 = step(x0, v(x0, as_batch_time(sigmas[i], x0)), sigmas[i], sigmas[i + 1])
    return PIPELINES[backbone.name][2](comps, x0, geom)


@torch.no_grad()
def _theirs(backbone, pipe, comps, cond, noise, res, steps=N, guidance=G):
    geom = backbone.geometry(comps, res)
    return PIPELINES[backbone.name][1](pipe, comps, cond, noise, geom, res, steps=steps, guidance=guidance)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_bf16_samples_are_the_pipelines_bit_for_bit(name):
    """256 px (1024 tokens: the dynamic shifts are not their 64 px values), bf16 weights, conditioning and noise:
    our x0 is the pipeline's exactly; the old float32 Euler arithmetic is not."""
    res = 256
    backbone = get_backbone(name)
    comps = backbone.build_tiny(TinyFluxConfig(), 0)
    comps.transformer.to(BF16)
    geom = backbone.geometry(comps, res)
    cond = _cond(backbone, comps, PROMPTS, BF16)
    latents = backbone.noise_dtype(BF16)  # Z-Image's pipeline keeps float32 latents
    noise = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0)).to(BF16).to(latents)
    theirs = _theirs(backbone, _pipe(name, comps), comps, cond, noise, res)
    ours = _ours(backbone, comps, cond, noise, res)
    if latents == BF16:
        old, what = _ours(backbone, comps, cond, noise, res, step=euler_step), "float32 Euler arithmetic"
    else:  # the old bf16 latents (the model's dtype)
        old, what = _ours(backbone, comps, cond, noise.to(BF16), res), "bf16 latents"
    print(
        f"{name} bf16 {res}px max|diff| vs {backbone.pipeline}: ours {(ours - theirs).abs().max():.2e}, "
        f"{what} {(old.float() - theirs.float()).abs().max():.2e}"
    )
    assert ours.dtype == theirs.dtype == latents and torch.isfinite(ours.float()).all()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert (old.float() - theirs.float()).abs().max() > 0  # the check sees the old arithmetic


def test_flux_bf16_time_is_the_pipelines_rounding():
    """FluxPipeline passes `(1000 t).to(bf16) / 1000`; `t.to(bf16)` (the old call) is another transformer input."""
    from leapalign_fast.models.flux import FluxVelocity, latent_image_ids

    comps = get_backbone("flux").build_tiny(TinyFluxConfig(), 0)
    tr = comps.transformer.to(BF16)
    t5, pooled = torch.randn(2, 8, 32, dtype=BF16), torch.randn(2, 32, dtype=BF16)
    x, t, ids = torch.randn(2, 16, 64, dtype=BF16), torch.tensor([0.7421875, 0.3090909]), latent_image_ids(8, 8)
    g = torch.full((2,), G)
    kw = dict(hidden_states=x, guidance=g, pooled_projections=pooled, encoder_hidden_states=t5, img_ids=ids)
    kw["txt_ids"] = torch.zeros(8, 3)
    with torch.no_grad():
        ours = FluxVelocity(tr, t5, pooled, ids, G)(x, t)
        pipeline = tr(timestep=(t * 1000).to(BF16) / 1000, return_dict=False, **kw)[0]
        old = tr(timestep=t.to(BF16), return_dict=False, **kw)[0]
    torch.testing.assert_close(ours, pipeline, rtol=0, atol=0)
    assert (old - pipeline).abs().max() > 0


class _Schedule(Exception):
    pass


def _pipeline_sigmas(monkeypatch, pipe, run) -> torch.Tensor:
    """The sigmas `pipe` sets on its scheduler (its own `retrieve_timesteps`), stopped before any forward."""
    module = sys.modules[type(pipe).__module__]
    original = module.retrieve_timesteps

    def spy(scheduler, *args, **kwargs):
        original(scheduler, *args, **kwargs)
        raise _Schedule(scheduler.sigmas.clone())

    monkeypatch.setattr(module, "retrieve_timesteps", spy)
    with pytest.raises(_Schedule) as stop:
        run()
    monkeypatch.setattr(module, "retrieve_timesteps", original)
    return stop.value.args[0]


def _schnell(comps):
    """The tiny FLUX build made FLUX.1-schnell-like: no guidance embedding, schnell's scheduler config."""
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in comps.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    comps.transformer = FluxTransformer2DModel(**{**config, "guidance_embeds": False})
    comps.scheduler = FlowMatchEulerDiscreteScheduler(**SCHNELL_SCHEDULER)
    return comps


@pytest.mark.parametrize("name", [*PIPELINES, "flux-schnell", "sd3-dynamic"])
def test_schedule_is_the_pipelines_at_512_and_1024(name, monkeypatch):
    """Where the shift matters most: 1024 and 4096 tokens, 25 steps; the pipeline's sigmas read as it sets them.
    FLUX.1-schnell's static shift 1.0 is 0.156 / 0.280 away from the dev schedule hard-coded before; an SD3
    directory whose config shifts dynamically takes mu of its patch count, as StableDiffusion3Pipeline."""
    backbone = get_backbone(name.split("-")[0])
    comps = backbone.build_tiny(TinyFluxConfig(), 0)
    if name == "flux-schnell":
        comps = _schnell(comps)
    if name == "sd3-dynamic":
        comps.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.2)
    pipe = _pipe(backbone.name, comps)
    cond = _cond(backbone, comps, PROMPTS[:1], torch.float32)
    for res, old_gap in ((512, 0.156), (1024, 0.280)):
        geom = backbone.geometry(comps, res)
        noise = torch.zeros(*geom.noise_shape(1))
        theirs = _pipeline_sigmas(monkeypatch, pipe, lambda: _theirs(backbone, pipe, comps, cond, noise, res, 25))
        ours = backbone.schedule(comps, 25, geom)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        if name == "flux-schnell":
            gap = (flux_schedule(25, geom.tokens) - theirs).abs().max().item()
            assert round(gap, 3) == old_gap, gap  # the old schedule fails this test


def test_flux_schnell_directory_samples_as_flux_pipeline(tmp_path, capsys, monkeypatch):
    """A schnell directory written by FluxPipeline.save_pretrained: loaded, its configured guidance is dropped (one
    log line) and our samples are the pipeline's in float32 and bf16; the old call (guidance always a tensor)
    raises the TypeError the finding reported."""
    from diffusers import FluxPipeline

    from leapalign_fast.models.flux import FluxVelocity, latent_image_ids

    monkeypatch.setattr(common, "_LOGGED", set())  # the line is logged once per process: count this test's
    backbone = get_backbone("flux")
    _pipe("flux", _schnell(backbone.build_tiny(TinyFluxConfig(), 0))).save_pretrained(tmp_path / "schnell")
    for dtype in (torch.float32, BF16):
        comps = backbone.load(tmp_path / "schnell", dtype, need_text=True, max_sequence_length=32)
        assert comps.scheduler.config.use_dynamic_shifting is False and comps.scheduler.config.shift == 1.0
        pipe = FluxPipeline.from_pretrained(tmp_path / "schnell", dtype=dtype, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        geom = backbone.geometry(comps, 64)
        cond = _cond(backbone, comps, PROMPTS, dtype)
        noise = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0)).to(dtype)
        ours, theirs = _ours(backbone, comps, cond, noise, 64), _theirs(backbone, pipe, comps, cond, noise, 64)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    log = capsys.readouterr().out
    assert log.count("guidance 3.5 is ignored: the FLUX transformer has no guidance embedding") == 1, log
    with pytest.raises(TypeError, match="positional arguments"):
        FluxVelocity(comps.transformer, cond["t5"], cond["pooled"], latent_image_ids(geom.h, geom.w), G)(
            noise, torch.ones(2)
        )


def test_distilled_klein_directory_runs_no_cfg_as_its_pipeline(tmp_path, capsys, monkeypatch):
    """A Flux2KleinPipeline(is_distilled=True) directory: `load` reads `is_distilled` from model_index.json, the
    velocity makes one forward per step whatever the guidance (the pipeline's 4 calls, not 8) and the samples are
    the pipeline's in bf16. Read as a base Klein (the old behaviour), CFG runs and the samples differ."""
    from diffusers import Flux2KleinPipeline

    monkeypatch.setattr(common, "_LOGGED", set())
    backbone = get_backbone("flux2")
    base = backbone.build_tiny(TinyFluxConfig(), 0)
    base.is_distilled = True
    _pipe("flux2", base).save_pretrained(tmp_path / "klein")
    comps = backbone.load(tmp_path / "klein", BF16, need_text=True, max_sequence_length=32)
    assert comps.is_distilled and not backbone.build_tiny(TinyFluxConfig(), 0).is_distilled
    pipe = Flux2KleinPipeline.from_pretrained(tmp_path / "klein", dtype=BF16, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.is_distilled
    calls = []
    comps.transformer.register_forward_hook(lambda *a: calls.append(1))
    pipe.transformer.register_forward_hook(lambda *a: calls.append(2))
    geom = backbone.geometry(comps, 64)
    cond = _cond(backbone, comps, PROMPTS, BF16)
    noise = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0)).to(BF16)
    theirs = _theirs(backbone, pipe, comps, cond, noise, 64, guidance=4.0)
    ours = _ours(backbone, comps, cond, noise, 64, guidance=4.0)
    assert calls.count(1) == calls.count(2) == N
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert capsys.readouterr().out.count("guidance 4.0 is ignored: this FLUX.2-Klein is step-wise distilled") == 1
    comps.is_distilled = False  # what the project ran before: CFG at guidance 4
    calls.clear()
    old = _ours(backbone, comps, cond, noise, 64, guidance=4.0)
    assert calls.count(1) == 2 * N and (old - theirs).abs().max() > 0.01


def test_qwenimage_refuses_one_step_whose_sigma_diffusers_makes_nan():
    backbone = get_backbone("qwenimage")
    comps = backbone.build_tiny(TinyFluxConfig(), 0)
    geom = backbone.geometry(comps, 64)
    with pytest.raises(UserError, match=r"^1 sampling step .*shift_terminal=0\.02.*use 2 or more steps") as e:
        backbone.schedule(comps, 1, geom)
    assert "\n" not in str(e.value)
    sched = FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler.config)
    sched.set_timesteps(sigmas=[1.0], mu=0.5)
    assert torch.isnan(sched.sigmas[0])  # what the refusal prevents
    two = backbone.schedule(comps, 2, geom)
    assert torch.isfinite(two).all() and two[0] == 1.0 and two[-1] == 0.0


@torch.no_grad()
@pytest.mark.parametrize("name", list(PIPELINES))
def test_non_square_samples_are_the_pipelines(name):
    """height != width (64 x 128, and 128 x 64): geometry, schedule, velocity (position ids) and latent layout as
    the pipeline's in float32 (to round-off); the transposed layout is not (the check can fail)."""
    backbone = get_backbone(name)
    comps = backbone.build_tiny(TinyFluxConfig(), 0)
    cond = backbone.encode_prompts(comps.text, PROMPTS[:1])
    results = {}
    for size in ((64, 128), (128, 64)):
        geom = backbone.geometry(comps, size)
        assert geom.pixels(size[0] // geom.h) == size and geom.h != geom.w
        noise = torch.randn(*geom.noise_shape(1), generator=torch.Generator().manual_seed(5))
        v = backbone.velocity(comps.transformer, {k: cond[k] for k in backbone.conditioning}, geom, G)
        ours = sample_trajectory(v, noise, backbone.schedule(comps, N, geom)).x0
        theirs = backbone.pipeline_sample(comps, cond, noise, geom, N, G)
        # float32 round-off at most (FLUX.2-Klein's CFG path: 2.4e-7, the same as at 64 x 64); a layout error is O(1)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        results[size] = (noise, ours)
    noise, ours = results[(64, 128)]
    flipped = backbone.geometry(comps, (128, 64))  # same tokens, transposed layout
    wrong = backbone.pipeline_sample(comps, cond, noise, flipped, N, G)
    assert (ours - wrong).abs().max() > 1e-4  # 100x the tolerance above (tiny random models: 8e-3 and more)


def test_a_non_square_run_trains_and_draws_non_square_grids(tmp_path):
    from PIL import Image

    from leapalign_fast.config import load_config
    from leapalign_fast.train import train

    cfg = load_config(
        None,
        [f"output_dir={tmp_path}", "height=64", "width=96", "max_steps=1", "batch_size=2"]
        + ["num_steps=3", "report_to=none", "eval_prompts=['a red square']"],
    )
    assert cfg.image_size == (64, 96)
    res = train(cfg)
    assert (res.trainer.geometry.h, res.trainer.geometry.w) == (8, 12)
    with Image.open(tmp_path / "grids" / "step_000001.png") as grid:
        assert grid.size[0] > grid.size[1]  # one image, wider than tall
    with pytest.raises(UserError, match="image width 100 is not divisible by 16"):
        train(load_config(None, [f"output_dir={tmp_path / 'bad'}", "height=64", "width=100"]))


@torch.no_grad()
def test_zimage_cfg_is_the_pipelines_with_its_normalization_and_truncation():
    """ZImagePipeline's CFG: none at guidance 0 (Turbo: one forward a step), `pos + g (pos - neg)` from one forward
    over [pos, neg] above it, and its `cfg_normalization` / `cfg_truncation` options: our samples are the pipeline's
    exactly (float32), and each option changes them (the check sees it)."""
    backbone = get_backbone("zimage")
    comps = backbone.build_tiny(TinyFluxConfig(), 0)
    cond = backbone.encode_prompts(comps.text, PROMPTS)
    geom = backbone.geometry(comps, (64, 96))
    noise = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(3))
    sigmas = backbone.schedule(comps, N, geom)
    batches = []
    comps.transformer.register_forward_hook(lambda m, args, out: batches.append(len(args[0])))
    samples = {}
    for name, guidance, opts in [
        ("turbo", 0.0, {}),
        ("cfg", G, {}),
        ("normalized", G, {"cfg_normalization": 1.0}),
        ("truncated", G, {"cfg_truncation": 0.2}),  # 1 - sigma: 0, 0.1, 0.25, 0.5 (shift 3): the last two
    ]:
        batches.clear()
        v = backbone.velocity(comps.transformer, cond, geom, guidance, **opts)
        ours = sample_trajectory(v, noise, sigmas).x0
        ours_batches = list(batches)
        theirs = backbone.pipeline_sample(comps, cond, noise, geom, N, guidance, **opts)
        assert batches[len(ours_batches) :] == ours_batches  # the same forwards, batched the same way
        print(f"zimage {name} max|diff| vs ZImagePipeline: {(ours - theirs).abs().max():.2e}")
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        samples[name] = ours
        if name == "turbo":
            assert ours_batches == [2] * N
        if name == "cfg":
            assert ours_batches == [4] * N
        if name == "truncated":
            assert ours_batches == [4, 4, 2, 2]
    for name in ("turbo", "normalized", "truncated"):
        assert (samples[name] - samples["cfg"]).abs().max() > 1e-3, name

"""FLUX components: tiny build, diffusers-format save/load, missing files, packing, prompt cache."""

import pytest
import torch

from leapalign_fast.errors import UserError
from leapalign_fast.models.flux import (
    FluxVelocity,
    TinyFluxConfig,
    build_tiny_flux,
    latent_image_ids,
    load_flux,
    pack_latents,
    save_flux,
    unpack_latents,
)
from leapalign_fast.models.text import encode_prompts, load_prompt_embeds, save_prompt_embeds


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_flux(TinyFluxConfig(), seed=0)


def test_pack_unpack_roundtrip_matches_diffusers():
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 6, 10)
    packed = pack_latents(z)
    assert packed.shape == (2, 15, 64)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(z, 2, 16, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 10), z, rtol=0, atol=0)
    ids = latent_image_ids(6, 10)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


def test_save_load_roundtrip_same_velocity_and_embeddings(tiny, tmp_path):
    save_flux(tiny, tmp_path / "flux")
    loaded = load_flux(tmp_path / "flux", torch.float32, max_sequence_length=tiny.text.max_sequence_length)
    prompts = ["a red square", "two blue circles left of a star"]
    a, b = encode_prompts(tiny.text, prompts), encode_prompts(loaded.text, prompts)
    torch.testing.assert_close(a.t5, b.t5, rtol=0, atol=0)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)
    x, t = torch.randn(2, 4, 64), torch.tensor([0.9, 0.3])
    ids = latent_image_ids(4, 4)
    with torch.no_grad():
        va = FluxVelocity(tiny.transformer, a.t5, a.pooled, ids, 3.5)(x, t)
        vb = FluxVelocity(loaded.transformer, b.t5, b.pooled, ids, 3.5)(x, t)
    torch.testing.assert_close(va, vb, rtol=0, atol=0)


def test_missing_files_are_listed(tiny, tmp_path):
    save_flux(tiny, tmp_path / "flux")
    (tmp_path / "flux" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    import shutil

    shutil.rmtree(tmp_path / "flux" / "tokenizer_2")
    with pytest.raises(UserError) as e:
        load_flux(tmp_path / "flux", torch.float32)
    msg = str(e.value)
    assert "vae/diffusion_pytorch_model.safetensors" in msg and "tokenizer_2/" in msg and "transformer" not in msg
    with pytest.raises(UserError, match="not a directory"):
        load_flux(tmp_path / "nowhere", torch.float32)


def test_resolution_must_fit_vae_and_packing(tiny):
    assert tiny.latent_hw(64) == (8, 8)
    with pytest.raises(UserError, match="not divisible by 16"):
        tiny.latent_hw(72)


def test_prompt_cache_roundtrip(tiny, tmp_path):
    e = encode_prompts(tiny.text, ["a red square", "a blue ball", "a green star"])
    save_prompt_embeds(e, tmp_path / "c.safetensors")
    back = load_prompt_embeds(tmp_path / "c.safetensors")
    assert back.prompts == e.prompts
    torch.testing.assert_close(back.t5, e.t5, rtol=0, atol=0)
    t5, pooled = back.select([2, 0])
    torch.testing.assert_close(pooled, e.pooled[[2, 0]], rtol=0, atol=0)
    assert not torch.equal(e.t5[0], e.t5[1])  # prompts differ -> embeddings differ

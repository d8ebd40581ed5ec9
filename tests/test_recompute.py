"""The decode's per-layer recompute (model.checkpoint_decode): same image, same gradients, less kept per layer."""

import pytest
import torch

from leapalign_fast.config import TinyFluxConfig
from leapalign_fast.recompute import checkpoint_decoder, decoder_checkpointed, decoder_layers


def _saved_mib(fn) -> float:
    """Distinct non-parameter storages autograd saves while `fn` runs."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values()) / 2**20


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_decoder_recomputed_per_layer_keeps_values_and_gradients(family):
    from leapalign_fast.models.flux import build_tiny_flux
    from leapalign_fast.models.flux2 import build_tiny_flux2

    vae = (build_tiny_flux if family == "flux" else build_tiny_flux2)(TinyFluxConfig(), 0).vae
    z = torch.randn(1, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    layers = decoder_layers(vae)
    # mid: 2 resnets (+ attention in FLUX.1's; FLUX.2's has none: [None]); 4 up blocks of 2 resnets; 3 upsamplers
    assert len(layers) == (3 if family == "flux" else 2) + 4 * 2 + 3

    def decode_and_grad():
        zz = z.clone().requires_grad_(True)
        img, saved = _saved_mib(lambda: vae.decode(zz, return_dict=False)[0])
        (img.square().mean()).backward()
        return img.detach(), zz.grad, saved

    img0, g0, saved_kept = decode_and_grad()
    checkpoint_decoder(vae, True)
    assert decoder_checkpointed(vae) and not vae.is_gradient_checkpointing  # per layer, not diffusers' per block
    img1, g1, saved_layers = decode_and_grad()
    torch.testing.assert_close(img1, img0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    # kept: each layer's input and the head's (one map each), not the ~6 maps a resnet saves
    assert saved_layers < saved_kept / 3, (saved_layers, saved_kept)
    with torch.no_grad():  # no-grad decodes (grids, evaluation) do not checkpoint
        torch.testing.assert_close(vae.decode(z, return_dict=False)[0], img0, rtol=0, atol=0)
    checkpoint_decoder(vae, False)
    assert not decoder_checkpointed(vae) and "forward" not in vae.decoder.__dict__
    assert not any("forward" in m.__dict__ for m in layers)
    torch.testing.assert_close(decode_and_grad()[0], img0, rtol=0, atol=0)

"""Activation checkpointing of the decode + reward that ends every method's step (`model.checkpoint_decode`).

Without it, the VAE decode and the reward model keep their whole autograd graph from the end of the forward to
the backward: at the mid size as large as one transformer forward, at FLUX size (VAE at 512²-1024², CLIP-H) often
larger. With it, only their inputs are kept, the (B, L, 64) latents and the (B, 3, H, W) image; the backward
re-runs each forward, and the decoder's own backward recomputes one layer (resnet, upsampler, attention) at a
time, so its transient is one layer's activations at the output resolution. Per diffusers block (its
`enable_gradient_checkpointing`) the transient was a whole up-block, 2-3 resnets: at the mid size 60 MiB of
LeapAlign's 217 MiB step peak (bench/results/memory_mid_cpu*.md). Values and gradients are unchanged (the
recompute is the same ops on the same inputs).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

LAYER_LISTS = ("resnets", "attentions", "upsamplers")  # the layers of diffusers' Decoder's mid and up blocks
# Set on the VAE while `model.checkpoint_decode` is on: a backbone's decode may read it to recompute itself in
# finer units than the whole decode (Wan's causal video decoder: one latent frame at a time, models/wan.py).
DECODE_RECOMPUTED = "_leapalign_decode_recomputed"
# Set (True) on a VAE whose backbone's decode does that: the whole-decode recompute is then not wrapped around it
# (nested, the outer recompute would re-run every unit with its graph kept, all units at once).
RECOMPUTES_ITSELF = "_leapalign_decode_recomputes_itself"


def recomputed(fn: Callable) -> Callable:
    """`fn(*args, **kwargs)` that keeps only its inputs for the backward and recomputes its graph there."""

    def call(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return call


def decoder_layers(vae) -> list[torch.nn.Module]:
    """The layers of an AutoencoderKL decoder (FLUX, SD3), each recomputed on its own; [] for other decoders
    (Qwen-Image's causal 3D decoder keeps per-call caches: a layer cannot be re-run on its own there)."""
    from diffusers.models.autoencoders.vae import Decoder

    dec = getattr(vae, "decoder", None)
    if type(dec) is not Decoder or dec.mid_block is None or not isinstance(dec.conv_norm_out, torch.nn.GroupNorm):
        return []  # not AutoencoderKL's decoder, or its spatial-norm variant
    blocks = [dec.mid_block, *dec.up_blocks]
    # a mid block without attention holds [None] as its attentions
    layers = [layer for b in blocks for name in LAYER_LISTS for layer in (getattr(b, name, None) or [])]
    return [layer for layer in layers if layer is not None]


def _head(dec, sample: torch.Tensor) -> torch.Tensor:
    """The decoder's output head (norm, activation, conv at full resolution), one unit so its backward keeps one
    map instead of three."""
    return dec.conv_out(dec.conv_act(dec.conv_norm_out(sample)))


def _decoder_forward(dec, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' `Decoder.forward` (no spatial norm) with its blocks' layers and its head each recomputed."""
    sample = dec.conv_in(sample)
    sample = dec.mid_block(sample, latent_embeds)
    sample = sample.to(next(iter(dec.up_blocks.parameters())).dtype)  # as diffusers < 0.33 (upscale_dtype)
    for up_block in dec.up_blocks:
        sample = up_block(sample, latent_embeds)
    return recomputed(_head)(dec, sample)


def checkpoint_decoder(vae, enabled: bool) -> None:
    """Recompute the decoder per layer (per diffusers block where the layers are not known); off: undo it."""
    setattr(vae, DECODE_RECOMPUTED, bool(enabled))
    layers = decoder_layers(vae)
    if layers and enabled and "forward" not in vae.decoder.__dict__:
        vae.decoder.forward = functools.partial(_decoder_forward, vae.decoder)
    elif not enabled and "forward" in vae.decoder.__dict__:
        del vae.decoder.forward
    for layer in layers:
        if enabled and "forward" not in layer.__dict__:
            layer.forward = recomputed(layer.forward)  # an instance attribute: nn.Module.__call__ calls it
        elif not enabled and "forward" in layer.__dict__:
            del layer.forward
    if getattr(vae, "_supports_gradient_checkpointing", False):
        per_block = enabled and not layers
        if per_block and not vae.is_gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        elif not per_block and vae.is_gradient_checkpointing:
            vae.disable_gradient_checkpointing()


def decoder_checkpointed(vae) -> bool:
    """Whether the decoder's backward recomputes (per layer, or per diffusers block)."""
    layers = decoder_layers(vae)
    if layers:
        return all("forward" in m.__dict__ for m in layers)
    return bool(getattr(vae, "is_gradient_checkpointing", False))


def checkpointed_decode_reward(vae, decode: Callable, reward: Callable, enabled: bool) -> tuple[Callable, Callable]:
    """(decode, reward) as a step uses them; with `enabled`, both are recomputed in the backward and the VAE
    decoder's backward recomputes one layer at a time (only grad-enabled calls: no-grad decodes such as grids are
    unaffected). Off undoes the decoder's checkpointing too, so one process can measure both."""
    checkpoint_decoder(vae, enabled)
    if not enabled:
        return decode, reward
    return (decode if getattr(vae, RECOMPUTES_ITSELF, False) else recomputed(decode)), recomputed(reward)

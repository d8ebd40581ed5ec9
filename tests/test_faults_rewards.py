"""Fault injection, part 3: independent checks against the official code. HPS v2.1's ResizeMaxSize (long side,
black padding) against a PIL re-implementation of open_clip's transform, torchvision's centre-crop rounding,
and `lora_ema/` holding the EMA, not the live weights."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from leapalign_fast.config import load_config
from leapalign_fast.rewards.clip_rewards import CLIP_MEAN, CLIP_STD, clip_preprocess, resize_max_preprocess
from leapalign_fast.train import train

SIZE = 32


def _resize_max_pil(u8: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip's ResizeMaxSize(size, fill=0) on a PIL image, then ToTensor and Normalize (HPSv2's inference)."""
    img = Image.fromarray(u8.permute(1, 2, 0).numpy())
    w, h = img.size
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if scale != 1.0:
        img = img.resize((nw, nh), Image.BICUBIC)
    if (nh, nw) != (size, size):  # open_clip pads only after a resize; we pad a long side already at `size` too
        pad_h, pad_w = size - nh, size - nw
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(img, (pad_w // 2, pad_h // 2))
        img = canvas
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.mark.parametrize("hw", [(64, 48), (48, 64), (100, 77), (77, 100), (64, 64), (40, 20), (21, 64), (32, 17)])
def test_hps_resize_max_matches_open_clip(hw):
    g = torch.Generator().manual_seed(1)
    u8 = (torch.rand(2, 3, *hw, generator=g) * 255).round().to(torch.uint8)
    ours = resize_max_preprocess(u8.float() / 255, SIZE)
    ref = torch.stack([_resize_max_pil(x, SIZE) for x in u8])
    diff = (ours - ref).abs()
    # PIL resamples uint8, we resample float: measured max 0.18 on one pixel of uniform noise, mean <= 0.003.
    # Padding misplaced by one column would add ~0.05 to the mean.
    assert ours.shape == (2, 3, SIZE, SIZE) and diff.max() < 0.25 and diff.mean() < 0.006, (diff.max(), diff.mean())
    if hw[0] != hw[1]:  # non-square: the short-side crop would see other pixels
        assert (clip_preprocess(u8.float() / 255, SIZE) - ref).abs().max() > 0.5


@pytest.mark.parametrize("w", range(33, 41))
@pytest.mark.parametrize("crop", ["round", "floor"])
def test_centre_crop_offset(crop, w):
    # h == SIZE: the resize is the identity, so the crop offset is visible exactly.
    x = torch.rand(1, 3, SIZE, w, generator=torch.Generator().manual_seed(w))
    left = int(round((w - SIZE) / 2.0)) if crop == "round" else (w - SIZE) // 2  # torchvision CenterCrop / HF
    want = (x[..., left : left + SIZE] - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(clip_preprocess(x, SIZE, crop=crop), want, atol=1e-4, rtol=0)


def test_imagereward_and_aesthetic_use_torchvision_rounding():
    import inspect

    from leapalign_fast.rewards import clip_rewards, imagereward

    assert 'crop="round"' in inspect.getsource(imagereward.ImageRewardModel.forward)
    assert 'preprocess="round"' in inspect.getsource(clip_rewards.build_aesthetic)
    assert 'preprocess="resize_max"' in inspect.getsource(clip_rewards.build_hpsv21)


def test_lora_ema_export_holds_the_ema(tmp_path):
    out = tmp_path / "run"
    train(
        load_config(
            None,
            [
                f"output_dir={out}",
                "max_steps=3",
                "checkpoint_every=3",
                "batch_size=2",
                "num_steps=4",
                "report_to=none",
                "lora.enabled=true",
                "lora.rank=4",
                "lr=1e-2",
                "ema_decay=0.5",
            ],
        )
    )
    live = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    ema_export = load_file(str(out / "lora_ema" / "pytorch_lora_weights.safetensors"))
    ema = load_file(str(out / "checkpoints" / "step_00000003" / "ema.safetensors"))
    trained = load_file(str(out / "checkpoints" / "step_00000003" / "trained.safetensors"))
    assert live.keys() == ema_export.keys() and len(live) == len(ema)

    def param_name(k):  # diffusers' LoRA key -> the peft parameter name
        return (
            k.removeprefix("transformer.")
            .replace(".lora_A.weight", ".lora_A.default.weight")
            .replace(".lora_B.weight", ".lora_B.default.weight")
        )

    for k in live:
        torch.testing.assert_close(ema_export[k], ema[param_name(k)], atol=0, rtol=0)
        torch.testing.assert_close(live[k], trained[param_name(k)], atol=0, rtol=0)
    assert any(not torch.equal(live[k], ema_export[k]) for k in live)  # the EMA lags the live weights

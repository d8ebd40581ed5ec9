"""Rewards of videos: any image reward applied per frame and averaged, and an optional temporal term.

A video backbone decodes (B, T, 3, H, W) in [0, 1]. `PerFrame` scores `frames` evenly spaced frames of it (all T
when 0; every frame is decoded either way, so the gradient reaches every latent frame through the VAE's temporal
layers) with the image reward, one (B K, 3, H, W) batch, and returns their mean per video:

    r(video) = mean_k r_img(frame_{i_k}) - temporal_weight * mean_{t, pixels} |frame_{t+1} - frame_t|

with i_k = round(k (T - 1) / (K - 1)). The temporal term, a frame-to-frame consistency penalty over all T frames,
is off at weight 0. Images (B, 3, H, W) pass to the image reward unchanged, so the wrapper is a no-op for image
backbones. The result is a (B,) reward like any other: the hinge and every method are unchanged.
"""

from __future__ import annotations

import torch

from leapalign_fast.errors import UserError


def frame_indices(total: int, frames: int) -> list[int]:
    """`frames` evenly spaced indices of `total` frames, first and last included; all of them when `frames` is 0
    or at least `total`."""
    if frames <= 0 or frames >= total:
        return list(range(total))
    if frames == 1:
        return [(total - 1) // 2]
    return [round(k * (total - 1) / (frames - 1)) for k in range(frames)]


def temporal_penalty(video: torch.Tensor) -> torch.Tensor:
    """(B,) mean |frame_{t+1} - frame_t| over frames and pixels; 0 for one frame."""
    if video.shape[1] < 2:
        return video.new_zeros(video.shape[0])
    return (video[:, 1:] - video[:, :-1]).abs().flatten(1).mean(dim=1)


class PerFrame(torch.nn.Module):
    """An image reward made a video reward (see the module docstring); images pass through unchanged."""

    def __init__(self, reward: torch.nn.Module, frames: int = 0, temporal_weight: float = 0.0):
        super().__init__()
        if frames < 0 or temporal_weight < 0:
            raise UserError(f"reward.frames ({frames}) and reward.temporal_weight ({temporal_weight}) must be >= 0")
        self.reward, self.frames, self.temporal_weight = reward, int(frames), float(temporal_weight)

    def check_prompts(self, prompts: list[str]) -> None:
        if hasattr(self.reward, "check_prompts"):
            self.reward.check_prompts(prompts)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.dim() == 4:
            return self.reward(images, prompts)
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"a video reward expects (B, T, 3, H, W) frames, got {tuple(images.shape)}")
        if getattr(self.reward, "scores_video", False):  # a reward of whole videos (e.g. `fade`)
            scores = self.reward(images, prompts)
            if self.temporal_weight:
                scores = scores - self.temporal_weight * temporal_penalty(images).to(scores.dtype)
            return scores
        b, t = images.shape[:2]
        idx = frame_indices(t, self.frames)
        picked = images[:, idx].flatten(0, 1)  # (B K, 3, H, W), video-major
        scores = self.reward(picked, [p for p in prompts for _ in idx]).view(b, len(idx)).mean(dim=1)
        if self.temporal_weight:
            scores = scores - self.temporal_weight * temporal_penalty(images).to(scores.dtype)
        return scores


def video_reward(reward: torch.nn.Module, frames: int = 0, temporal_weight: float = 0.0) -> PerFrame:
    """`reward` (a built image reward) scoring videos per frame; a no-op wrapper on images."""
    return PerFrame(reward, frames, temporal_weight).eval().requires_grad_(False)


class FadeReward(torch.nn.Module):
    """`fade`, the toy video reward: how much brighter the last frame is than the first (mean of RGB, in [-1, 1]).
    It needs the frames in time order, so it checks the frame axis; an image scores 0."""

    scores_video = True

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.dim() == 4:
            return images.new_zeros(images.shape[0])
        return images[:, -1].flatten(1).mean(dim=1) - images[:, 0].flatten(1).mean(dim=1)


def build_fade_reward() -> torch.nn.Module:
    return FadeReward()

"""Image grids as PNG, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from leapalign_fast.io import atomic_write


def save_grid(images: torch.Tensor | np.ndarray, path: Path, columns: int | None = None) -> None:
    """images (B, 3, H, W) in [0, 1] or videos (B, T, 3, H, W), or a grid from `grid_array`, -> one PNG."""
    array = images if isinstance(images, np.ndarray) else grid_array(images, columns)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def grid_array(images: torch.Tensor, columns: int | None = None) -> np.ndarray:
    """images (B, 3, H, W) in [0, 1] -> one (rows * H, cols * W, 3) uint8 grid, white where no image falls;
    videos (B, T, 3, H, W): a row of frames per video."""
    if images.dim() == 5:
        columns = images.shape[1]
        images = images.flatten(0, 1)
    b, _, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.ones(3, rows * h, cols * w)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i].detach().float().cpu()
    return (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

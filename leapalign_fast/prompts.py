"""Prompts: the built-in tiny prompt set, prompt files, and the deterministic prompt order."""

from __future__ import annotations

from pathlib import Path

import torch

from leapalign_fast.errors import UserError

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "cyan", "brown"]
_SHAPES = ["square", "circle", "triangle", "star", "ring", "cross"]


def builtin_prompts() -> list[str]:
    """72 prompts 'a <colour> <shape>' for the tiny default (the `colour` reward reads the colour)."""
    return [f"a {c} {s}" for c in _COLOURS for s in _SHAPES]


def validation_prompts(cfg) -> list[list[str]]:
    """The prompt sets validation needs embedded (for build_run's prompt cache): [] when validation is off."""
    return [read_prompt_file(cfg.eval_prompt_file)] if cfg.eval_every else []


def read_prompt_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt_file {p} not found; give a text file with one prompt per line")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the first prompt
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"prompt_file {p} cannot be read as UTF-8 text ({e}); fix its encoding or permissions"
        ) from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"prompt_file {p} has no prompts; write one prompt per line")
    return prompts


class PromptOrder:
    """An endless stream of prompt indices: a fresh seeded permutation each epoch.

    Its whole state is `consumed` (indices handed out so far), so a checkpoint stores one integer and
    resume continues the exact same order.
    """

    def __init__(self, num_prompts: int, seed: int, consumed: int = 0):
        self.n, self.seed, self.consumed = num_prompts, seed, consumed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def take(self, count: int) -> list[int]:
        out = []
        for pos in range(self.consumed, self.consumed + count):
            out.append(self._permutation(pos // self.n)[pos % self.n])
        self.consumed += count
        return out

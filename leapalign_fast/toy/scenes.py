"""Procedural 64x64 scenes of coloured shapes on black, with captions in GenEval's six categories.

A scene is rendered from a `Spec` (what the caption asks for) plus the objects that realise it. Captions use only
words the tiny tokenizers know whole (models.text.TINY_WORDS). Images: float (3, H, W) in [0, 1].
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
SHAPES = ("square", "circle", "triangle")
CATEGORIES = ("single", "two", "counting", "colours", "position", "binding")
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
NUMBERS = {2: "two", 3: "three"}
SIZE = 64


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float  # centre, pixels
    cy: float
    size: float  # bounding-box side, pixels


@dataclass(frozen=True)
class Spec:
    """What a caption asks for. `objects` are (colour or None, shape) pairs; `count` for counting;
    `relation` for position (object 0 relative to object 1)."""

    category: str
    objects: tuple[tuple[str | None, str], ...]
    count: int = 1
    relation: str | None = None


@dataclass
class Scene:
    caption: str
    spec: Spec
    objects: list[Obj] = field(default_factory=list)


def caption(spec: Spec) -> str:
    def noun(colour, shape):
        return f"a {colour} {shape}" if colour else f"a {shape}"

    (c0, s0), *rest = spec.objects
    if spec.category in ("single", "colours"):
        return noun(c0, s0)
    if spec.category == "counting":
        return f"{NUMBERS[spec.count]} {c0} {s0}s"
    c1, s1 = rest[0]
    if spec.category == "position":
        return f"{noun(c0, s0)} {spec.relation} {noun(c1, s1)}"
    return f"{noun(c0, s0)} and {noun(c1, s1)}"


def parse_caption(text: str) -> Spec | None:
    """The Spec a caption of this grammar states (the inverse of `caption`), or None for any other text."""
    words = text.strip().split()
    numbers = {v: k for k, v in NUMBERS.items()}

    def noun(ws):  # "a [colour] shape" -> (colour or None, shape)
        if len(ws) == 2 and ws[0] == "a" and ws[1] in SHAPES:
            return None, ws[1]
        if len(ws) == 3 and ws[0] == "a" and ws[1] in COLOURS and ws[2] in SHAPES:
            return ws[1], ws[2]
        return None

    if (
        len(words) == 3
        and words[0] in numbers
        and words[1] in COLOURS
        and words[2][:-1] in SHAPES
        and words[2][-1] == "s"
    ):
        return Spec("counting", ((words[1], words[2][:-1]),), count=numbers[words[0]])
    one = noun(words)
    if one:
        return Spec("colours" if one[0] else "single", (one,))
    for rel in list(RELATIONS) + ["and"]:
        r = rel.split()
        for i in range(1, len(words)):
            if words[i : i + len(r)] == r:
                a, b = noun(words[:i]), noun(words[i + len(r) :])
                if a and b and rel != "and" and a[0] and b[0]:
                    return Spec("position", (a, b), relation=rel)
                if a and b and rel == "and" and bool(a[0]) == bool(b[0]):
                    return Spec("binding" if a[0] else "two", (a, b))
    return None


def render(objects: list[Obj], size: int = SIZE) -> np.ndarray:
    """(3, size, size) float32 in [0, 1]: shapes painted in order on black."""
    img = np.zeros((3, size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for o in objects:
        h = o.size / 2
        dx, dy = xx - o.cx, yy - o.cy
        if o.shape == "square":
            mask = (np.abs(dx) <= h) & (np.abs(dy) <= h)
        elif o.shape == "circle":
            mask = dx**2 + dy**2 <= h**2
        else:  # upright isosceles triangle in its bounding box
            t = (dy + h) / (2 * h)  # 0 at the apex row, 1 at the base
            mask = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h)
        img[:, mask] = np.asarray(COLOURS[o.colour], dtype=np.float32)[:, None]
    return img


def _place(rng: random.Random, n: int, size: float, taken: list[Obj]) -> list[tuple[float, float]]:
    """n non-overlapping centres (bounding boxes apart by 4 px) inside the canvas."""
    out: list[tuple[float, float]] = []
    lo, hi = size / 2 + 2, SIZE - size / 2 - 2
    for _ in range(1000):
        if len(out) == n:
            return out
        c = (rng.uniform(lo, hi), rng.uniform(lo, hi))
        others = out + [(o.cx, o.cy) for o in taken]
        if all(max(abs(c[0] - x), abs(c[1] - y)) >= size + 4 for x, y in others):
            out.append(c)
    raise RuntimeError("could not place objects; canvas too small for this scene")


def sample_spec(category: str, rng: random.Random) -> Spec:
    colours, shapes = list(COLOURS), list(SHAPES)
    if category == "single":
        return Spec(category, ((None, rng.choice(shapes)),))
    if category == "colours":
        return Spec(category, ((rng.choice(colours), rng.choice(shapes)),))
    if category == "counting":
        return Spec(category, ((rng.choice(colours), rng.choice(shapes)),), count=rng.choice(list(NUMBERS)))
    s0, s1 = rng.sample(shapes, 2)
    if category == "two":
        return Spec(category, ((None, s0), (None, s1)))
    c0, c1 = rng.sample(colours, 2)
    if category == "binding":
        return Spec(category, ((c0, s0), (c1, s1)))
    if category == "position":
        return Spec(category, ((c0, s0), (c1, s1)), relation=rng.choice(list(RELATIONS)))
    raise ValueError(f"unknown category {category!r}; one of {CATEGORIES}")


def realise(spec: Spec, rng: random.Random) -> Scene:
    """Objects that satisfy `spec` (unspecified colours drawn at random)."""
    size = rng.uniform(12, 16)
    pick = lambda c: c or rng.choice(list(COLOURS))  # noqa: E731
    if spec.category == "counting":
        ((c, s),) = spec.objects
        centres = _place(rng, spec.count, size, [])
        objs = [Obj(s, c, x, y, size) for x, y in centres]
    elif spec.category == "position":
        (c0, s0), (c1, s1) = spec.objects
        ux, uy = RELATIONS[spec.relation]
        for _ in range(1000):  # object 0 clearly on the named side of object 1: the main axis dominates
            (x1, y1), (x0, y0) = _place(rng, 2, size, [])
            main, other = ((x0 - x1) * ux, y0 - y1) if ux else ((y0 - y1) * uy, x0 - x1)
            if main > size and main > 1.5 * abs(other) + 3:
                break
        objs = [Obj(s0, c0, x0, y0, size), Obj(s1, c1, x1, y1, size)]
    else:
        centres = _place(rng, len(spec.objects), size, [])
        objs = [Obj(s, pick(c), x, y, size) for (c, s), (x, y) in zip(spec.objects, centres)]
    return Scene(caption(spec), spec, objs)


def sample_scene(rng: random.Random, category: str | None = None) -> Scene:
    return realise(sample_spec(category or rng.choice(CATEGORIES), rng), rng)


def prompt_set(n_per_category: int, seed: int) -> list[tuple[str, Spec]]:
    """Distinct (caption, spec) pairs, `n_per_category` per category, for training and evaluation prompts."""
    rng, out, seen = random.Random(seed), [], set()
    for cat in CATEGORIES:
        tries = 0
        count = 0
        while count < n_per_category and tries < 10000:
            tries += 1
            spec = sample_spec(cat, rng)
            if caption(spec) not in seen:
                seen.add(caption(spec))
                out.append((caption(spec), spec))
                count += 1
    return out

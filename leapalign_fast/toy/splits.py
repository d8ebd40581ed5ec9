"""Train / validation / test captions of the toy benchmark: disjoint by construction, with a compositional hold-out.

An *object* is a (colour, shape) pair. Of the 4 x 3 = 12 objects, three are held out for test and three for
validation, each set a transversal (no colour or shape twice), so every colour and every shape keeps at least one
training object:

    test        red triangle, green circle, blue square
    validation  yellow triangle, red circle, green square
    train       red square, green triangle, blue circle, blue triangle, yellow square, yellow circle

A caption with a colour (colours, counting, binding, position) is a *test* caption if it names any test object,
else a *validation* caption if it names any validation object, else a *training* caption. So no colour-shape,
count-object, object-object or object-relation-object combination of a test (or validation) caption occurs in
training. The two categories without colours:

- `two`: the unordered shape pair is held out: {circle, triangle} test, {square, triangle} validation,
  {square, circle} train (both word orders of a pair stay in one split).
- `single`: only 3 captions exist ("a circle", "a square", "a triangle") and each shape must be trainable, so
  all three are in every split: held out in noise (fresh seeds) only, not in content. The benchmark reports
  `overall` (GenEval's mean of the six categories) and `heldout` (the five compositional categories).

Sizes (every caption of the grammar is in exactly one split, `single` in all three):

    split       single two counting colours binding position   total
    train         3     2     12       6      20       80       123
    validation    3     2      6       3      22       88       124
    test          3     2      6       3      30      120       164
"""

from __future__ import annotations

import random
from itertools import product

from leapalign_fast.toy.scenes import CATEGORIES, COLOURS, NUMBERS, RELATIONS, SHAPES, Spec, caption

SPLITS = ("train", "validation", "test")
HELD_OUT = {
    "test": frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")}),
    "validation": frozenset({("yellow", "triangle"), ("red", "circle"), ("green", "square")}),
}
HELD_OUT_PAIRS = {"test": frozenset({"circle", "triangle"}), "validation": frozenset({"square", "triangle"})}


def split_of(spec: Spec) -> str:
    """The split a caption belongs to (`single` captions belong to all three: this returns "train")."""
    if spec.category == "single":
        return "train"
    if spec.category == "two":
        shapes = frozenset(s for _, s in spec.objects)
        return next((name for name, pair in HELD_OUT_PAIRS.items() if shapes == pair), "train")
    for name in ("test", "validation"):
        if any(obj in HELD_OUT[name] for obj in spec.objects):
            return name
    return "train"


def all_specs() -> list[Spec]:
    """Every caption of the grammar, once, in a fixed order (category, then objects)."""
    objects = list(product(COLOURS, SHAPES))
    pairs = [(a, b) for a in objects for b in objects if a[0] != b[0] and a[1] != b[1]]
    out = [Spec("single", ((None, s),)) for s in SHAPES]
    out += [Spec("two", ((None, a), (None, b))) for a in SHAPES for b in SHAPES if a != b]
    out += [Spec("counting", (o,), count=n) for n in NUMBERS for o in objects]
    out += [Spec("colours", (o,)) for o in objects]
    out += [Spec("binding", p) for p in pairs]
    out += [Spec("position", p, relation=r) for p in pairs for r in RELATIONS]
    assert {s.category for s in out} == set(CATEGORIES)
    return out


def split_specs(split: str) -> list[Spec]:
    """Every caption of `split` (train, validation or test), in a fixed order; `single` captions in each."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    return [s for s in all_specs() if s.category == "single" or split_of(s) == split]


def evaluation_set(split: str, per_category: int, seed: int = 0) -> list[tuple[str, Spec]]:
    """`per_category` (caption, spec) pairs per category of `split`, for equal-weight per-category accuracies: each
    category's captions in a fixed shuffled order, cycled when it has fewer than `per_category` (the repeats are
    sampled from different noise)."""
    out = []
    for cat in CATEGORIES:
        specs = [s for s in split_specs(split) if s.category == cat]
        random.Random(f"{split}:{cat}:{seed}").shuffle(specs)
        out += [(caption(s), s) for s in (specs[i % len(specs)] for i in range(per_category))]
    return out

"""The toy benchmark's caption splits (disjoint, compositional hold-out, shipped files up to date) and the
evaluator's one-blob-one-object rule."""

from pathlib import Path

import numpy as np
import pytest

from leapalign_fast.toy.evaluator import detect, judge
from leapalign_fast.toy.scenes import CATEGORIES, COLOURS, SHAPES, Obj, Spec, caption, parse_caption, render
from leapalign_fast.toy.splits import HELD_OUT, SPLITS, all_specs, evaluation_set, split_of, split_specs

ROOT = Path(__file__).resolve().parent.parent


def _objects(spec):
    return {o for o in spec.objects if o[0] is not None}


def test_splits_are_disjoint_and_cover_the_grammar():
    captions = {s: {caption(x) for x in split_specs(s) if x.category != "single"} for s in SPLITS}
    assert not captions["train"] & captions["validation"]
    assert not captions["train"] & captions["test"]
    assert not captions["validation"] & captions["test"]
    every = {caption(x) for x in all_specs()}
    assert len(every) == len(all_specs()) == 405
    singles = {caption(x) for x in all_specs() if x.category == "single"}
    assert set().union(*captions.values()) | singles == every
    for s in SPLITS:  # the single-object captions (3 in all) are in every split, held out in noise only
        assert {caption(x) for x in split_specs(s) if x.category == "single"} == singles
        assert {x.category for x in split_specs(s)} == set(CATEGORIES)
    sizes = {s: len(split_specs(s)) for s in SPLITS}
    assert sizes == {"train": 123, "validation": 124, "test": 164}


@pytest.mark.parametrize("held", ["validation", "test"])
def test_no_held_out_combination_occurs_in_training(held):
    train = [x for x in split_specs("train") if x.category != "single"]
    train_objects = set().union(*(_objects(x) for x in train))
    train_pairs = {frozenset(s for _, s in x.objects) for x in train if x.category == "two"}
    train_counts = {(x.count, x.objects[0]) for x in train if x.category == "counting"}
    train_triples = {(x.objects, x.relation) for x in train if x.category in ("binding", "position")}
    for x in split_specs(held):
        if x.category == "single":
            continue
        if x.category == "two":
            assert frozenset(s for _, s in x.objects) not in train_pairs
            continue
        assert _objects(x) - train_objects, x  # some colour-shape combination never trained
        assert (x.count, x.objects[0]) not in train_counts
        assert (x.objects, x.relation) not in train_triples
    # every colour and every shape still appears in training
    assert {c for c, _ in train_objects} == set(COLOURS) and {s for _, s in train_objects} == set(SHAPES)
    assert not HELD_OUT[held] & train_objects


def test_shipped_prompt_files_match_the_splits():
    for s in SPLITS:
        lines = (ROOT / "assets" / "toy" / f"prompts_{s}.txt").read_text().splitlines()
        assert lines == [caption(x) for x in split_specs(s)]
        assert all(
            parse_caption(c) is not None and (parse_caption(c).category == "single" or split_of(parse_caption(c)) == s)
            for c in lines
        )


def test_evaluation_set_is_balanced_and_fixed():
    ev = evaluation_set("test", 8)
    assert len(ev) == 8 * len(CATEGORIES) and ev == evaluation_set("test", 8)
    for cat in CATEGORIES:
        caps = [c for c, s in ev if s.category == cat]
        assert len(caps) == 8
        assert len(set(caps)) == min(8, len([x for x in split_specs("test") if x.category == cat]))
    assert all(s.category == "single" or split_of(s) == "test" for _, s in ev)


def _gradient_blob(shape: str, vertical: bool) -> np.ndarray:
    """One red-to-yellow (orange) blob: green rises across it from 0.2 to 0.8."""
    img = render([Obj(shape, "red", 32, 32, 24)])
    ramp = np.linspace(0.2, 0.8, 64, dtype=np.float32)
    img[1] = img[0] * (ramp[:, None] if vertical else ramp[None, :])
    return img


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("vertical", [False, True])
def test_one_orange_blob_is_one_object(shape, vertical):
    """The first detector segmented each palette colour apart: one orange circle became a red triangle and a yellow
    circle, and passed "a triangle and a circle"."""
    img = _gradient_blob(shape, vertical)
    found = detect(img)
    assert len(found) == 1 and found[0].shape == shape
    assert found[0].colour in ("mixed", "yellow")  # (the triangle's wide base sits where the ramp is near yellow)
    others = [s for s in SHAPES if s != shape]
    for a in SHAPES:
        for b in others:
            if a != b:
                assert not judge(img, Spec("two", ((None, a), (None, b))))
    assert not judge(img, Spec("colours", (("red", shape),)))
    assert judge(img, Spec("single", ((None, shape),)))
    assert not judge(img, Spec("counting", (("red", shape),), count=2))

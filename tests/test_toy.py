"""Toy benchmark pieces: the rule-based evaluator on hand-made scenes of known content, and the procedural
dataset's captions agreeing with its images."""

import random

import numpy as np
import pytest

from leapalign_fast.models.text import TINY_WORDS
from leapalign_fast.toy.evaluator import MAX_SPECKS, assess, detect, evaluate_images, evaluate_strict, judge, specks
from leapalign_fast.toy.scenes import CATEGORIES, Obj, Spec, caption, prompt_set, render, sample_scene

RED_SQ = Obj("square", "red", 16, 32, 14)
BLUE_CI = Obj("circle", "blue", 48, 32, 14)


def test_detects_hand_made_scene():
    found = sorted(detect(render([RED_SQ, BLUE_CI])), key=lambda f: f.cx)
    assert [(f.colour, f.shape) for f in found] == [("red", "square"), ("blue", "circle")]
    assert abs(found[0].cx - 16) < 1 and abs(found[0].cy - 32) < 1 and abs(found[1].cx - 48) < 1
    assert found[0].area == 14 * 14


@pytest.mark.parametrize(
    "spec, truth",
    [
        (Spec("single", ((None, "circle"),)), True),
        (Spec("single", ((None, "triangle"),)), False),
        (Spec("colours", (("red", "square"),)), True),
        (Spec("colours", (("blue", "square"),)), False),
        (Spec("two", ((None, "square"), (None, "circle"))), True),
        (Spec("two", ((None, "square"), (None, "triangle"))), False),
        (Spec("binding", (("red", "square"), ("blue", "circle"))), True),
        (Spec("binding", (("blue", "square"), ("red", "circle"))), False),  # attributes swapped
        (Spec("position", (("red", "square"), ("blue", "circle")), relation="left of"), True),
        (Spec("position", (("red", "square"), ("blue", "circle")), relation="right of"), False),
        (Spec("position", (("blue", "circle"), ("red", "square")), relation="right of"), True),
        (Spec("position", (("red", "square"), ("blue", "circle")), relation="above"), False),
    ],
)
def test_judges_hand_made_scene(spec, truth):
    assert judge(render([RED_SQ, BLUE_CI]), spec) is truth


def test_counting_and_vertical_relations():
    tris = [Obj("triangle", "green", x, 20, 14) for x in (12, 32, 52)]
    img = render(tris + [Obj("square", "yellow", 32, 50, 14)])
    assert judge(img, Spec("counting", (("green", "triangle"),), count=3))
    assert not judge(img, Spec("counting", (("green", "triangle"),), count=2))
    assert judge(img, Spec("position", (("yellow", "square"), ("green", "triangle")), relation="below"))
    assert not judge(img, Spec("position", (("yellow", "square"), ("green", "triangle")), relation="above"))


def test_robust_to_noise_and_empty_images():
    rng = np.random.default_rng(0)
    noisy = np.clip(render([RED_SQ, BLUE_CI]) + rng.normal(0, 0.05, (3, 64, 64)), 0, 1)
    assert judge(noisy, Spec("binding", (("red", "square"), ("blue", "circle"))))
    assert detect(np.zeros((3, 64, 64))) == []
    assert not judge(np.zeros((3, 64, 64)), Spec("single", ((None, "circle"),)))


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_shapes_survive_the_soft_edges_of_generated_images(sigma):
    """Generated images are soft-edged: blurred renders keep their shapes (>= 90% of 90 objects per blur)."""
    import torch

    from leapalign_fast.toy.reward import gaussian_blur

    rng = random.Random(int(sigma * 10))
    objs = [
        Obj(
            s,
            rng.choice(["red", "green", "blue", "yellow"]),
            rng.uniform(20, 44),
            rng.uniform(20, 44),
            rng.uniform(12, 16),
        )
        for s in ("square", "circle", "triangle")
        for _ in range(30)
    ]
    images = gaussian_blur(torch.from_numpy(np.stack([render([o]) for o in objs])), sigma).numpy()
    hits = [[f.shape for f in detect(im)] == [o.shape] for o, im in zip(objs, images)]
    assert np.mean(hits) >= 0.9, np.mean(hits)


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_generated_scene_satisfies_its_caption(category):
    rng = random.Random(CATEGORIES.index(category))
    words = set(TINY_WORDS)
    for _ in range(60):
        scene = sample_scene(rng, category)
        assert scene.caption == caption(scene.spec) and scene.spec.category == category
        assert judge(render(scene.objects), scene.spec), scene
        assert all(w in words or (w.endswith("s") and w[:-1] in words) for w in scene.caption.split())


def test_evaluate_images_and_prompt_set():
    specs = [
        Spec("single", ((None, "circle"),)),
        Spec("single", ((None, "triangle"),)),
        Spec("colours", (("red", "square"),)),
    ]
    img = render([RED_SQ, BLUE_CI])
    table = evaluate_images([img, img, img], specs)
    assert table == {"single": 0.5, "colours": 1.0, "overall": 0.75}
    prompts = prompt_set(5, seed=0)
    # 'single' has only 3 distinct captions (one per shape); every other category has more than 5
    assert len(prompts) == 3 + 5 * 5 and len({c for c, _ in prompts}) == len(prompts)
    assert prompt_set(5, seed=0) == prompts


def test_strict_score_fails_an_extra_object_and_passes_the_same_image_without_it():
    green = Spec("colours", (("green", "circle"),))
    one = [Obj("circle", "green", 20, 20, 14)]
    four = one + [Obj("circle", "green", x, y, 14) for x, y in ((46, 20), (20, 46), (46, 46))]
    alone, crowded = assess(render(one), green), assess(render(four), green)
    assert alone.passed and alone.strict and (alone.objects, alone.extra, alone.specks) == (1, 0, 0)
    # GenEval-style: four green circles pass "a green circle"; strict: three objects too many
    assert crowded.passed and not crowded.strict and (crowded.objects, crowded.extra) == (4, 3)
    counting = Spec("counting", (("green", "circle"),), count=2)
    assert assess(render(four[:2]), counting).strict
    assert not assess(render(four[:2] + [Obj("square", "red", 46, 46, 14)]), counting).strict
    table = evaluate_strict([render(one), render(four), np.zeros((3, 64, 64))], [green, green, green])
    assert table["colours"] == pytest.approx(2 / 3) and table["strict"] == pytest.approx(1 / 3)
    assert table["objects"] == pytest.approx(5 / 3) and table["extra"] == 1.0 and table["empty"] == pytest.approx(1 / 3)


def _lattice(img: np.ndarray, level: float = 0.3, step: int = 8) -> np.ndarray:
    """A regular lattice of faint 2 x 2 px green specks over the whole image (kept off the objects)."""
    out = img.copy()
    for y in range(3, 64, step):
        for x in range(3, 64, step):
            if img[:, max(0, y - 4) : y + 6, max(0, x - 4) : x + 6].max() == 0:
                out[1, y : y + 2, x : x + 2] = level
    return out


def test_speck_lattice_is_an_artefact_and_a_clean_scene_is_not():
    import torch

    from leapalign_fast.toy.reward import gaussian_blur

    spec = Spec("binding", (("red", "square"), ("blue", "circle")))
    clean = render([RED_SQ, BLUE_CI])
    latticed = _lattice(clean)
    # the GenEval-style detector never sees the specks (each 4 px of brightness 0.3): same objects, still a pass
    assert detect(latticed) == detect(clean) and judge(latticed, spec)
    a = assess(latticed, spec)
    assert a.specks > 20 and a.artefact and not a.strict
    assert specks(clean) == 0 and assess(clean, spec).strict and not assess(clean, spec).artefact
    soft = gaussian_blur(torch.from_numpy(clean[None]), 1.5)[0].numpy()  # soft object edges are not specks
    assert specks(soft) == 0 and assess(soft, spec).strict
    few = clean.copy()
    few[1, 3:5, 3:5] = few[1, 3:5, 59:61] = 0.3  # MAX_SPECKS stray marks are tolerated, one more is not
    assert specks(few) == 2 == MAX_SPECKS and assess(few, spec).strict
    few[1, 59:61, 3:5] = 0.3
    assert specks(few) == 3 and not assess(few, spec).strict


def test_toy_reward_perturbations_gradients_and_roundtrip(tmp_path):
    import torch

    from leapalign_fast.errors import UserError
    from leapalign_fast.rewards import build_reward
    from leapalign_fast.toy.reward import perturb, save_toy_reward, train_toy_reward, training_batch
    from leapalign_fast.toy.scenes import sample_spec

    rng = random.Random(0)
    for cat in CATEGORIES:  # every negative caption differs from the positive one
        for _ in range(20):
            spec = sample_spec(cat, rng)
            assert caption(perturb(spec, rng)) != caption(spec)
    images, captions, labels = training_batch(rng, 3)
    assert images.shape == (6, 3, 64, 64) and labels.tolist() == [1, 0] * 3
    model = train_toy_reward(steps=3, batch=4, seed=0, log=lambda *_: None)
    save_toy_reward(model, tmp_path / "reward.safetensors")
    loaded = build_reward("toy", path=str(tmp_path / "reward.safetensors"))
    x = images.clone().requires_grad_(True)
    score = loaded(x, captions)
    torch.testing.assert_close(score, model(images, captions), rtol=0, atol=0)
    assert score.shape == (6,) and torch.isfinite(score).all()
    assert torch.autograd.grad(score.sum(), x)[0].abs().sum() > 0
    with pytest.raises(UserError, match="missing.safetensors not found"):
        build_reward("toy", path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="needs reward.options.path"):
        build_reward("toy")
    with pytest.raises(UserError, match="combine must be 'mean' or 'min'"):
        build_reward("toy", path=[str(tmp_path / "reward.safetensors")] * 2, combine="max")
    # an ensemble of two copies scores like one; min and mean of equal members agree
    for combine in ("mean", "min"):
        pair = build_reward("toy", path=[str(tmp_path / "reward.safetensors")] * 2, combine=combine)
        torch.testing.assert_close(pair(images, captions), score.detach(), rtol=1e-6, atol=1e-5)
    # contrast: minus the mean logit of near-miss captions, computed from the same image features
    contrast = build_reward("toy", path=str(tmp_path / "reward.safetensors"), contrast=3)
    from leapalign_fast.toy.reward import near_misses

    expect = model.logits(images, captions) - torch.stack(
        [model.logits(images, [near_misses(c, 3)[k] for c in captions]) for k in range(3)]
    ).mean(0)
    torch.testing.assert_close(contrast(images, captions), expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="cannot parse prompt 'a photo of a dog'"):
        contrast(images[:1], ["a photo of a dog"])
    # generator images (a bank) as positives
    bank = (images[:2].numpy(), [sample_scene(rng), sample_scene(rng)])
    imgs, caps, labels = training_batch(random.Random(1), 8, bank=bank, bank_frac=1.0, junk=1.0)
    assert any(
        np.array_equal(imgs[i].numpy(), bank[0][0]) or np.array_equal(imgs[i].numpy(), bank[0][1])
        for i in range(0, 16, 2)
    )
    assert caps[0::2] == caps[1::2] and labels.tolist() == [1, 0] * 8  # junk negatives keep the caption


def test_parse_caption_inverts_caption_and_near_misses_are_fixed():
    from leapalign_fast.toy.reward import near_misses
    from leapalign_fast.toy.scenes import parse_caption

    rng = random.Random(0)
    for _ in range(600):
        scene = sample_scene(rng)
        assert parse_caption(scene.caption) == scene.spec
    for text in ["a dog", "a red circle and a square", "two circles", "a circle left of a square", "", "red circle"]:
        assert parse_caption(text) is None, text
    misses = near_misses("a red circle left of a blue square", 4)
    assert misses == near_misses("a red circle left of a blue square", 4) and len(misses) == 4
    assert all(parse_caption(m) is not None and m != "a red circle left of a blue square" for m in misses)


@pytest.fixture(scope="module")
def toy_assets(tmp_path_factory):
    """A (barely) pretrained toy FLUX directory and toy reward, from the repo's own scripts."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    d = tmp_path_factory.mktemp("toy")
    for cmd in (
        [
            str(root / "bench" / "pretrain_toy.py"),
            "--vae-steps",
            "2",
            "--flow-steps",
            "2",
            "--batch",
            "4",
            "--bank",
            "256",
            "--out",
            str(d / "flux"),
        ],
        [
            str(root / "bench" / "train_toy_reward.py"),
            "--steps",
            "3",
            "--batch",
            "4",
            "--bank-model",
            str(d / "flux"),
            "--bank",
            "8",
            "--bank-steps",
            "2",
            "--out",
            str(d / "reward.safetensors"),
        ],
    ):
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return d


@pytest.mark.slow
def test_pretrain_script_writes_a_directory_the_trainer_loads(toy_assets, tmp_path):
    import json

    from leapalign_fast.config import load_config
    from leapalign_fast.train import train

    meta = json.loads((toy_assets / "flux.json").read_text())
    assert meta["flow_steps"] == 2 and meta["environment"]["torch"]
    assert 0.0 <= json.loads((toy_assets / "reward.json").read_text())["pairwise_accuracy"] <= 1.0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square and a green triangle\n")
    res = train(
        load_config(
            None,
            [
                f"output_dir={tmp_path / 'run'}",
                f"model.source={toy_assets / 'flux'}",
                f"prompt_file={prompts}",
                "eval_prompts=['a red circle']",
                "max_steps=2",
                "batch_size=2",
                "num_steps=4",
                "report_to=none",
                "reward.name=toy",
                f"reward.options={{path = '{toy_assets / 'reward.safetensors'}'}}",
            ],
        )
    )
    assert res.steps == 2 and len(res.rewards) == 2


@pytest.mark.slow
def test_pretrain_script_new_transformer_on_components_with_model_guidance(toy_assets, tmp_path):
    """--components-from (a fresh transformer of another width on a model's VAE and text encoders) with caption
    dropout, model guidance and uniform times runs and records them; model guidance without caption dropout (no
    unconditional branch to read) is refused with one message."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "pretrain_toy.py"
    base = [
        sys.executable,
        str(script),
        "--components-from",
        str(toy_assets / "flux"),
        "--flow-steps",
        "2",
        "--batch",
        "4",
        "--bank",
        "64",
        "--width",
        "32",
        "--layers",
        "1",
    ]
    proc = subprocess.run(
        [
            *base,
            "--caption-dropout",
            "0.5",
            "--mg-scale",
            "0.5",
            "--mg-ramp",
            "1",
            "--t-dist",
            "uniform",
            "--out",
            str(tmp_path / "flux"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "flux.json").read_text())
    assert (meta["width"], meta["layers"], meta["vae_steps"], meta["t_dist"]) == (32, 1, 0, "uniform")
    assert (meta["caption_dropout"], meta["mg_scale"], meta["components_from"]) == (0.5, 0.5, str(toy_assets / "flux"))
    bad = subprocess.run(
        [*base, "--mg-scale", "0.5", "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=600
    )
    assert bad.returncode != 0 and "--mg-scale needs --caption-dropout > 0" in bad.stderr


@pytest.mark.slow
def test_quality_bench_quick(toy_assets, tmp_path):
    """The benchmark end to end (1 seed, 3 steps); in parallel (--jobs 2) it gives the very same numbers."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tables = []
    for jobs in ("1", "2"):
        out = tmp_path / jobs
        proc = subprocess.run(
            [
                sys.executable,
                str(root / "bench" / "quality.py"),
                "--quick",
                "--model",
                str(toy_assets / "flux"),
                "--reward",
                str(toy_assets / "reward.safetensors"),
                "--ood-reward",
                str(toy_assets / "reward.safetensors"),
                "--methods",
                "leapalign",
                "refl",
                "--jobs",
                jobs,
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((out / "quality_toy_validation_quick.json").read_text())
        table = result["table"]
        assert set(table) == {"base", "leapalign", "refl"}
        strict = {f"strict/{c}" for c in CATEGORIES} | {"strict", "objects", "extra", "empty", "specks", "artefact"}
        assert set(table["leapalign"]) == set(CATEGORIES) | strict | {
            "overall",
            "heldout",
            "reward",
            "ood_reward",
            "colour_entropy",
            "diversity",
        }
        rates = [*CATEGORIES, "overall", "heldout", "strict", "empty", "artefact"]
        assert all(0.0 <= table[m][c]["mean"] <= 1.0 for m in table for c in rates)
        assert all(table[m]["strict"]["mean"] <= table[m]["overall"]["mean"] for m in table)
        assert set(result["vs_base"]) == {"leapalign", "refl"} and "t" in result["vs_base"]["leapalign"]["overall"]
        assert "t" in result["vs_base"]["leapalign"]["strict"] and "refl" in result["between_strict"]["leapalign"]
        run = result["per_seed"]["leapalign"]["0"]
        assert run["steps"] == 3 and run["grad_forwards_per_step"] == 2.0  # LeapAlign: two grad-enabled leaps
        assert result["per_seed"]["refl"]["0"]["grad_forwards_per_step"] == 1.0
        assert (out / "quality_toy_validation_quick_reward_curves.png").is_file()
        assert (out / "quality_toy_validation_quick_samples" / "leapalign.png").is_file()
        tables.append({m: {s: r["table"] for s, r in runs.items()} for m, runs in result["per_seed"].items()})
    assert json.dumps(tables[0], sort_keys=True) == json.dumps(tables[1], sort_keys=True)  # nan-safe equality


def test_paired_statistics():
    from bench.stats import mean_ci, paired, t_quantile, t_sf2

    assert abs(t_quantile(0.975, 7) - 2.364624) < 1e-5 and abs(t_quantile(0.975, 2) - 4.302653) < 1e-5
    assert abs(t_sf2(3.0, 7) - 0.019942) < 1e-5
    s = mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and abs(s["ci"][1] - (2 + 4.302653 / 3**0.5)) < 1e-5
    d = paired([1, 2, 3, 4], [0, 1, 1, 2])
    assert d["diff"] == 1.5 and d["wins"] == 4 and abs(d["t"] - 1.5 / (0.57735 / 2)) < 1e-3


def test_graded_ranks_passing_above_partial_above_wrong():
    spec = Spec("binding", (("red", "square"), ("blue", "circle")))
    right = render([Obj("square", "red", 16, 16, 14), Obj("circle", "blue", 46, 46, 14)])
    half = render([Obj("square", "red", 16, 16, 14), Obj("circle", "green", 46, 46, 14)])  # one colour wrong
    wrong = render([Obj("triangle", "yellow", 30, 30, 14)])
    assert judge(right, spec) and not judge(half, spec)
    from leapalign_fast.toy.evaluator import graded

    one = render([Obj("square", "red", 16, 16, 14)])  # one of the two objects
    g = [graded(im, spec) for im in (right, half, one, wrong, np.zeros((3, 64, 64), np.float32))]
    assert g[0] == 1.0 and 0.5 > g[1] > g[2] > g[3] >= g[4] >= 0.0, g
    clutter = render(
        [Obj("square", "red", 16, 16, 12), Obj("circle", "blue", 46, 46, 12), Obj("square", "green", 46, 12, 12)]
    )
    assert graded(clutter, spec) < 1.0  # an extra object costs partial credit, not the pass
    # the strict annotator: an extra object or a speck lattice costs the pass, not only partial credit
    assert graded(right, spec, strict=True) == 1.0 and graded(clutter, spec, strict=True) < 0.5 <= graded(clutter, spec)
    latticed = _lattice(right)
    assert graded(latticed, spec) == 1.0 and graded(latticed, spec, strict=True) < 0.5
    assert graded(half, spec, strict=True) > graded(_lattice(half), spec, strict=True)  # specks cost partial credit


def test_colour_entropy_sees_collapse():
    from leapalign_fast.toy.evaluator import colour_entropy

    rng = random.Random(0)
    specs = [Spec("single", ((None, "circle"),))] * 16 + [Spec("two", ((None, "square"), (None, "triangle")))] * 16
    varied = [render([Obj("circle", rng.choice(["red", "green", "blue", "yellow"]), 32, 32, 14)]) for _ in range(16)]
    varied += [
        render(
            [
                Obj("square", rng.choice(["red", "green", "blue", "yellow"]), 16, 16, 12),
                Obj("triangle", rng.choice(["red", "green", "blue", "yellow"]), 46, 46, 12),
            ]
        )
        for _ in range(16)
    ]
    collapsed = [render([Obj("circle", "red", rng.uniform(20, 44), 32, rng.uniform(10, 20))]) for _ in range(16)]
    collapsed += [render([Obj("square", "red", 16, 16, 12), Obj("triangle", "red", 46, 46, 12)]) for _ in range(16)]
    assert colour_entropy(varied, specs) > 1.5
    assert colour_entropy(collapsed, specs) == 0.0  # varied layouts and sizes: the pixel distance would not see it
    coloured = [Spec("colours", (("red", "circle"),))] * 16  # captions that name a colour are not counted
    assert np.isnan(colour_entropy(collapsed[:16], coloured))


def test_preference_pairs_agreement_and_lr_choice():
    """Pairs point from the higher graded score to the lower (same caption, or same image under two captions), ties
    below the margin give none; agreement counts a scorer that reverses the order as 0; the tuner keeps the lr with
    the best validation score per method, the smaller on a tie."""
    from bench.train_pref_reward import agreement, preference_pairs
    from bench.tune_toy import choose

    rows = [(0, "a", 0.9), (1, "a", 0.2), (2, "a", 0.22), (0, "b", 0.1)]
    pairs, n_caption = preference_pairs(rows, margin=0.05)
    assert n_caption == 2 and set(pairs[:2]) == {((0, "a"), (1, "a")), ((0, "a"), (2, "a"))}
    assert pairs[2:] == [((0, "a"), (0, "b"))]
    g, passed = np.array([0.9, 0.2, 0.6]), np.array([True, False, True])
    assert agreement(np.array([3.0, 1.0, 2.0]), ["a"] * 3, g, passed) == {
        "pairwise_accuracy": 1.0,
        "pairwise_accuracy_ci": [1.0, 1.0],
        "graded_pairs": 3,
        "auc": 1.0,
        "auc_ci": [1.0, 1.0],
        "pass_fail_pairs": 2,
    }
    assert agreement(-np.array([3.0, 1.0, 2.0]), ["a"] * 3, g, passed)["pairwise_accuracy"] == 0.0
    # two captions, one ranked right and one wrong: 0.5 overall, and the caption bootstrap spans both
    mixed = agreement(
        np.array([3.0, 1.0, 1.0, 3.0]), ["a", "a", "b", "b"], np.array([0.9, 0.2, 0.9, 0.2]), passed[[0, 1, 0, 1]]
    )
    assert mixed["pairwise_accuracy"] == 0.5 and mixed["pairwise_accuracy_ci"] == [0.0, 1.0]
    assert choose({"m": {"5e-5": 0.2, "1e-4": 0.3, "2e-4": 0.3}, "n": {"5e-5": 0.4, "1e-4": 0.1}}) == {
        "m": "1e-4",
        "n": "5e-5",
    }


def test_object_edits_add_or_remove_exactly_one_object_and_the_strict_annotator_sees_it():
    """bench/train_pref_reward.py --edits: an added copy is one more object of the same shape and colour, away from
    the others; a removed object leaves none behind (no specks either); the strict grade ranks the edit as the
    annotator should (an extra circle below the right image; for "two green circles", adding the missing one above)."""
    import torch

    from bench.train_pref_reward import edit_object, edited_copies
    from leapalign_fast.toy.evaluator import graded
    from leapalign_fast.toy.reward import gaussian_blur

    green = Spec("colours", (("green", "circle"),))
    soft = gaussian_blur(torch.from_numpy(render([Obj("circle", "green", 20, 20, 14)])[None]), 1.0)[0].numpy()
    for seed in range(5):
        added = edit_object(soft, random.Random(seed), add=True)
        found = detect(added)
        assert len(found) == 2 and {(f.colour, f.shape) for f in found} == {("green", "circle")}
        assert abs(found[0].cx - found[1].cx) + abs(found[0].cy - found[1].cy) > 14 and specks(added) == 0
        assert graded(added, green, strict=True) < graded(soft, green, strict=True)
        two = Spec("counting", (("green", "circle"),), count=2)
        assert assess(added, two).strict and graded(added, two, strict=True) > graded(soft, two, strict=True)
    removed = edit_object(soft, random.Random(0), add=False)
    assert detect(removed) == [] and specks(removed) == 0 and np.abs(removed).max() < 1e-3
    assert edit_object(np.zeros((3, 64, 64), np.float32), random.Random(0), add=True) is None
    full = render([Obj("square", "red", x, y, 20) for x in (10, 32, 54) for y in (10, 32, 54)])  # no empty place
    assert edit_object(full, random.Random(0), add=True) is None
    images = np.stack([soft, np.zeros_like(soft)])
    edited, caps = edited_copies(images, ["a green circle", "a red square"], 2, seed=0)
    assert len(edited) == 2 and caps == ["a green circle"] * 2  # the empty image has nothing to edit
    assert [len(detect(e)) for e in edited] == [2, 0]  # add, then remove, in turn


@pytest.mark.slow
def test_preference_reward_sample_cache_gives_the_same_reward_and_refuses_other_arguments(tmp_path):
    """bench/train_pref_reward.py --samples: the second run reads the samples back and trains bit-identical weights;
    a cache made with other arguments is refused, not reused."""
    from bench.train_pref_reward import main

    base = [
        "--per-caption",
        "2",
        "--val-per-caption",
        "1",
        "--steps",
        "3",
        "--compare",
        "--samples",
        str(tmp_path / "s"),
    ]
    for i in (1, 2):
        assert main([*base, "--out", str(tmp_path / f"r{i}.safetensors")]) == 0
    assert (tmp_path / "r1.safetensors").read_bytes() == (tmp_path / "r2.safetensors").read_bytes()
    assert (tmp_path / "s_train.safetensors").is_file() and (tmp_path / "s_val.safetensors").is_file()
    with pytest.raises(SystemExit, match="made with other arguments"):
        main([*base[:-2], "--samples", str(tmp_path / "s"), "--per-caption", "4", "--out", str(tmp_path / "r3.st")])
    # --edits on the same samples: the edited copies are annotated and trained on, the samples' own count is kept
    import json

    assert main([*base, "--edits", "2", "--out", str(tmp_path / "e.safetensors")]) == 0
    record = json.loads((tmp_path / "e.json").read_text())
    first = json.loads((tmp_path / "r1.json").read_text())
    assert record["train_images"] == first["train_images"] and 0 < record["edited_images"] <= 2 * first["train_images"]
    assert (
        record["annotations"]
        == first["annotations"] * (record["train_images"] + record["edited_images"]) // (first["train_images"])
    )


def test_rescore_reads_committed_grids_in_caption_order(tmp_path):
    """bench/rescore_toy.py: the grid's images are paired with the captions bench/quality.py sampled them for."""
    import json

    import torch

    from bench.rescore_toy import grid_specs, main
    from leapalign_fast.images import save_grid
    from leapalign_fast.toy.scenes import realise

    specs = grid_specs("validation", 4, 12)
    assert [s.category for s in specs] == [c for c in CATEGORIES for _ in range(2)]
    rng = random.Random(0)
    clean = np.stack([render(realise(s, rng).objects) for s in specs])
    (tmp_path / "x.json").write_text(
        json.dumps({"settings": {"split": "validation", "images": "4", "grid": "12", "seeds": "[5, 6]"}})
    )
    save_grid(torch.from_numpy(clean), tmp_path / "x_samples" / "base.png", columns=6)
    save_grid(
        torch.from_numpy(np.stack([_lattice(im) for im in clean])), tmp_path / "x_samples" / "hack.png", columns=6
    )
    assert main(["x", "--name", "y", "--results", str(tmp_path), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "y.json").read_text())
    assert result["table"]["base"]["passed"]["mean"] == 1.0 == result["table"]["base"]["strict"]["mean"]
    assert result["table"]["hack"]["passed"]["mean"] == 1.0 and result["table"]["hack"]["artefact"]["mean"] == 1.0
    assert result["vs_base"]["hack"]["strict"]["diff"] == -1.0 and result["per_image"]["base"]["seed"] == 5


def test_seeds_needed_matches_power_tables():
    from bench.stats import seeds_for_halfwidth, seeds_needed, t_quantile

    # paired t, alpha 0.05 two-sided, power 0.8: 10 pairs for an effect of one sd, 34 for half an sd (exact tables)
    assert seeds_needed(1.0, 1.0) == 10 and seeds_needed(0.02, 0.01) == 34 and seeds_needed(0.02, -0.01) == 34
    assert seeds_needed(1.0, 1.0, power=0.9) > 10 and seeds_needed(1.0, 0.0, n_max=50) == 51
    n = seeds_for_halfwidth(0.03, 0.01)
    assert t_quantile(0.975, n - 1) * 0.03 / n**0.5 <= 0.01 < t_quantile(0.975, n - 2) * 0.03 / (n - 1) ** 0.5


def test_chi_square_quantiles_and_sd_interval_match_tables():
    from bench.stats import chi2_quantile, sd_ratio_interval

    # tabulated chi-square quantiles (df 1, 7, 23, 100) to the printed digits
    table = {(0.975, 7): 16.013, (0.025, 7): 1.690, (0.975, 23): 38.076, (0.025, 23): 11.689, (0.5, 1): 0.455}
    for (q, df), value in {**table, (0.95, 100): 124.342}.items():
        assert abs(chi2_quantile(q, df) - value) < 1e-3, (q, df)
    lo, hi = sd_ratio_interval(8)
    assert abs(lo - 0.661) < 1e-3 and abs(hi - 2.035) < 1e-3
    lo24, hi24 = sd_ratio_interval(24)
    assert lo < lo24 < 1 < hi24 < hi  # more seeds, a narrower interval around the measured sd


def test_toy_report_tables_from_a_committed_result():
    """bench/toy_report.py: Δ vs base cells are the quality JSON's paired differences, the between-method counts are
    the intervals that exclude 0, and the Bonferroni threshold is the t quantile at alpha / pairs (14.09 for 10 pairs
    at 3 seeds, the tabulated t(0.9975, 2))."""
    import json
    from pathlib import Path

    from bench.toy_report import bonferroni_t, report

    result = json.loads(
        (Path(__file__).resolve().parent.parent / "bench/results/quality_strict_tuning_lr5e-5.json").read_text()
    )
    text = report(result)
    assert abs(bonferroni_t(3, 10) - 14.089) < 0.01
    d = result["vs_base"]["leapalign"]["strict"]
    assert f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (t {d['t']:.2f}, {d['wins']}/3)" in text
    methods = sorted(result["vs_base"])
    for key, title in (("between", "GenEval-style"), ("between_strict", "strict")):
        cis = [result[key][a][b]["ci"] for i, a in enumerate(methods) for b in methods[i + 1 :]]
        resolved = sum(lo > 0 or hi < 0 for lo, hi in cis)
        assert f"{title} score: paired difference" in text and f"{resolved} of {len(cis)} intervals exclude 0" in text


def test_quality_pools_runs_files_and_refuses_runs_that_differ(tmp_path):
    """bench/quality.py --from-runs with several runs.jsonl: every (method, seed) once; a run found twice with the same
    table is one run, with another table an error naming both files. --per-method files merge; a conflict is an error.
    """
    import json

    from bench.quality import load_runs, per_method_overrides

    def run(method, seed, strict):
        return json.dumps({"task": [method, seed], "table": {"strict": strict, "overall": float("nan")}}) + "\n"

    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    a.write_text(run("base", 1, 0.2) + run("leapalign", 1, 0.3) + run("base", 2, 0.25))
    b.write_text(run("base", 2, 0.25) + run("refl", 2, 0.1) + "\n")
    runs = load_runs([a, b])
    assert sorted(r["task"] for r in runs) == [("base", 1), ("base", 2), ("leapalign", 1), ("refl", 2)]
    c.write_text(run("base", 2, 0.26))
    with pytest.raises(SystemExit, match=r"base seed 2 differs between .*a\.jsonl and .*c\.jsonl"):
        load_runs([a, c])

    t1, t2, t3 = tmp_path / "t1.json", tmp_path / "t2.json", tmp_path / "t3.json"
    t1.write_text(json.dumps({"overrides": {"leapalign": ["lr=2.5e-5"], "refl": ["lr=5e-5"]}}))
    t2.write_text(json.dumps({"overrides": {"draft": ["lr=1e-4"], "refl": ["lr=5e-5"]}}))
    t3.write_text(json.dumps({"overrides": {"leapalign": ["lr=1e-4"]}}))
    assert per_method_overrides([t1, t2]) == {"leapalign": ["lr=2.5e-5"], "refl": ["lr=5e-5"], "draft": ["lr=1e-4"]}
    with pytest.raises(SystemExit, match=r"t3\.json sets leapalign to \['lr=1e-4'\]"):
        per_method_overrides([t1, t3])


def test_reward_variants_table_from_committed_records(tmp_path):
    """bench/reward_variants.py: a row per record with its agreement and interval; records scored on other
    validation pairs (another generator) are refused, not tabulated side by side."""
    import json
    from pathlib import Path

    from bench.reward_variants import table

    folder = Path(__file__).resolve().parent.parent / "bench/results/toy_reward_strict_variants"
    v1, v2 = (json.loads((folder / f"{v}.json").read_text()) for v in ("v1", "v2"))
    text = table({"a": v1, "b": v2})
    a = v2["agreement"]["validation"]
    lo, hi = a["pairwise_accuracy_ci"]
    assert f"| b | 0 | {a['pairwise_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |" in text
    counting = v1["agreement"]["validation_by_category"]["counting"]
    assert f"{counting['pairwise_accuracy']:.2f} / {counting['auc']:.2f}" in text.splitlines()[2]
    with pytest.raises(SystemExit, match="b: model is 'elsewhere'"):
        table({"a": v1, "b": {**v2, "model": "elsewhere"}})
    other_pairs = {**v2, "agreement": {**v2["agreement"], "validation": {**a, "graded_pairs": a["graded_pairs"] + 1}}}
    with pytest.raises(SystemExit, match="b: other validation pairs than a's"):
        table({"a": v1, "b": other_pairs})
    from bench.reward_variants import main

    with pytest.raises(SystemExit, match="give NAME=PATH"):
        main([str(folder / "v1.json"), "--out", str(tmp_path / "t.md")])

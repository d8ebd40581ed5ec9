"""Re-score the sample grids that bench/quality.py committed with today's evaluator (GenEval-style and strict), no
training: a cheap first look at what a benchmark's images hold beyond its pass rate.

    python bench/rescore_toy.py quality_toy_test_pref quality_toy_test_pref_rest --name quality_toy_test_pref_rescored

Each `<name>_samples/<method>.png` holds `--grid` images of the benchmark's first seed (bench/quality.py's
grid_images: the first images of every category, category-major, 6 to a row); their captions come from the same
evaluation set (split and images per category from `<name>.json`). Every method's images share the base model's
captions and evaluation noise, so each image is paired with the base image of its position. Per method: the
GenEval-style and strict pass rates over the grid's images, their paired differences against base with a 95% t
interval over images, objects, extra objects, empty images, specks and artefact per image.

The grids are a small sample (12 images of one seed per method): the intervals are over images of one seed, not
over seeds, and say nothing about seed-to-seed spread; the benchmark's own multi-seed run is the real measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from bench.stats import mean_ci, paired  # noqa: E402
from leapalign_fast.toy.evaluator import assess  # noqa: E402
from leapalign_fast.toy.scenes import CATEGORIES, SIZE  # noqa: E402
from leapalign_fast.toy.splits import evaluation_set  # noqa: E402

COLUMNS = ("passed", "strict", "objects", "extra", "empty", "specks", "artefact")


def grid_specs(split: str, images: int, grid: int) -> list:
    """The specs of bench/quality.py's grid images, in grid order."""
    per = max(1, -(-grid // len(CATEGORIES)))
    pick = sorted([c * images + j for j in range(min(per, images)) for c in range(len(CATEGORIES))][:grid])
    specs = [s for _, s in evaluation_set(split, images, seed=0)]
    return [specs[i] for i in pick]


def read_grid(path: Path, count: int) -> np.ndarray:
    """(count, 3, SIZE, SIZE) images in [0, 1] from a grid PNG (images.save_grid: row-major, no padding)."""
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    cols = arr.shape[1] // SIZE
    out = [
        arr[(i // cols) * SIZE : (i // cols + 1) * SIZE, (i % cols) * SIZE : (i % cols + 1) * SIZE]
        for i in range(count)
    ]
    return np.stack(out).transpose(0, 3, 1, 2)


def rescore(names: list[str], results: Path) -> dict:
    """{method: {"seed", "split", "images": [per-image columns]}} over every grid of the named benchmarks."""
    out: dict[str, dict] = {}
    for name in names:
        settings = json.loads((results / f"{name}.json").read_text())["settings"]
        split, images, grid = settings["split"], int(settings["images"]), int(settings["grid"])
        seed = int(settings["seeds"].strip("[]").split(",")[0])
        specs = grid_specs(split, images, grid)
        folder = results / f"{name}_samples"
        if not folder.is_dir():
            raise SystemExit(f"{folder} does not exist: {name} kept no sample grids")
        for png in sorted(folder.glob("*.png")):
            method = png.stem
            rows = []
            for img, spec in zip(read_grid(png, len(specs)), specs):
                a = assess(img, spec)
                rows.append(
                    {
                        "category": spec.category,
                        "passed": float(a.passed),
                        "strict": float(a.strict),
                        "objects": float(a.objects),
                        "extra": float(a.extra),
                        "empty": float(a.objects == 0),
                        "specks": float(a.specks),
                        "artefact": float(a.artefact),
                    }
                )
            previous = out.get(method)
            if previous is not None and previous["images"] != rows:
                raise SystemExit(f"{method} has different grids in two of {names}; re-score them separately")
            out[method] = {"seed": seed, "split": split, "source": f"{name}_samples/{png.name}", "images": rows}
    if "base" not in out:
        raise SystemExit(f"no base.png among the grids of {names}: nothing to pair the methods with")
    return out


def summarise(scored: dict) -> dict:
    base = scored["base"]["images"]
    table = {m: {c: mean_ci([r[c] for r in s["images"]]) for c in COLUMNS} for m, s in scored.items()}
    vs_base = {
        m: {c: paired([r[c] for r in s["images"]], [r[c] for r in base]) for c in COLUMNS}
        for m, s in scored.items()
        if m != "base"
    }
    return {"table": table, "vs_base": vs_base}


def markdown(summary: dict, scored: dict, names: list[str]) -> str:
    t, vb = summary["table"], summary["vs_base"]
    order = ["base"] + sorted(m for m in t if m != "base")
    n = len(scored["base"]["images"])
    seed, split = scored["base"]["seed"], scored["base"]["split"]
    ci = lambda d: f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"  # noqa: E731
    md = [
        f"Re-scored sample grids of {', '.join(f'`{x}`' for x in names)}: split `{split}`, seed {seed}, {n} images "
        "per method (the first images of each category), each paired with the base image of the same caption "
        "and noise. Intervals: 95% t over these images of one seed, not over seeds.",
        "",
        "| method | pass (GenEval-style) | strict | objects | extra | empty | specks | artefact |",
        "|---" * 8 + "|",
    ]
    for m in order:
        md.append(f"| {m} | " + " | ".join(f"{t[m][c]['mean']:.3f}" for c in COLUMNS) + " |")
    md += [
        "",
        "Paired differences against base over the images: mean [95% CI]",
        "",
        "| method | Δ pass (GenEval-style) | Δ strict | Δ objects | Δ artefact |",
        "|---" * 5 + "|",
    ]
    for m in order[1:]:
        md.append(f"| {m} | " + " | ".join(ci(vb[m][c]) for c in ("passed", "strict", "objects", "artefact")) + " |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", help="bench/quality.py result names whose <name>_samples/ grids to re-score")
    p.add_argument("--name", required=True, help="output name: bench/results/<name>.{json,md}")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    scored = rescore(args.names, args.results)
    summary = summarise(scored)
    md = markdown(summary, scored, args.names)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(md)
    write_result(args.out / f"{args.name}.json", {**summary, "per_image": scored, "grids": args.names})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

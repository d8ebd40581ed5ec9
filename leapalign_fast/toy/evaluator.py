"""Rule-based evaluator for the toy scenes: colour segmentation, connected components, shape by fill ratio,
centroids. Exact on rendered scenes; never used as a training reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leapalign_fast.toy.scenes import COLOURS, RELATIONS, Spec

MIN_AREA = 20  # pixels; smaller blobs are noise
COLOUR_TOL = 0.45  # max RGB distance to a palette colour
FOREGROUND = 0.5  # min brightest channel of an object pixel (every palette colour has a channel >= 0.8)
MIN_PURITY = 0.5  # min fraction of an object's pixels near its colour; below: "mixed"


@dataclass(frozen=True)
class Found:
    colour: str
    shape: str
    cx: float
    cy: float
    area: int


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, as arrays of (y, x) pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.asarray(pix))
    return comps


def classify_shape(pix: np.ndarray) -> str:
    """Shape of a component from its (y, x) pixels, robust to the soft edges of generated images (exact on crisp
    renders, >= 95% on renders blurred up to sigma 2 px): a triangle is the only shape whose rows widen from top to
    bottom; a square fills its bounding box or at least its corners, a circle neither."""
    ys, xs = pix[:, 0] - pix[:, 0].min(), pix[:, 1] - pix[:, 1].min()
    h, w = ys.max() + 1, xs.max() + 1
    mask = np.zeros((h, w), dtype=bool)
    mask[ys, xs] = True
    rows = mask.sum(1).astype(np.float64)
    q = max(1, h // 4)
    if (rows[-q:].mean() - rows[:q].mean()) / rows.max() > 0.35:
        return "triangle"
    c = max(1, min(h, w) // 5)
    corners = np.mean([mask[:c, :c].mean(), mask[:c, -c:].mean(), mask[-c:, :c].mean(), mask[-c:, -c:].mean()])
    return "square" if mask.mean() > 0.88 or corners > 0.5 else "circle"


def detect(image: np.ndarray) -> list[Found]:
    """Objects in a (3, H, W) image in [0, 1]. An object is a connected component of the foreground (pixels at
    least FOREGROUND bright in some channel), so one blob is one object whatever its colours; its colour is the
    palette colour that at least MIN_PURITY of its pixels are within COLOUR_TOL of, else "mixed" (which matches no
    colour but still counts as its shape for captions without colours). Segmenting each palette colour separately
    (the first version) split one orange blob into a red and a yellow object, which passed "a triangle and a
    circle"."""
    img = np.asarray(image, dtype=np.float32)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
    dist = np.linalg.norm(img[None] - palette[:, :, None, None], axis=1)  # (K, H, W)
    nearest = np.where(dist.min(0) < COLOUR_TOL, dist.argmin(0), -1)  # (H, W) palette index, -1 for none
    names = list(COLOURS)
    found = []
    for pix in _components(img.max(0) >= FOREGROUND):
        if len(pix) < MIN_AREA:
            continue
        votes = np.bincount(nearest[pix[:, 0], pix[:, 1]] + 1, minlength=len(names) + 1)[1:]
        colour = names[int(votes.argmax())] if votes.max() >= MIN_PURITY * len(pix) else "mixed"
        found.append(
            Found(colour, classify_shape(pix), float(pix[:, 1].mean()) + 0.5, float(pix[:, 0].mean()) + 0.5, len(pix))
        )
    return found


def _match(found: list[Found], colour: str | None, shape: str) -> list[Found]:
    return [f for f in found if f.shape == shape and (colour is None or f.colour == colour)]


def judge(image: np.ndarray, spec: Spec) -> bool:
    """Does the image show what the spec asks for (GenEval-style, per category)?"""
    found = detect(image)
    objs = spec.objects
    if spec.category in ("single", "colours"):
        return bool(_match(found, *objs[0]))
    if spec.category == "counting":
        return len(_match(found, *objs[0])) == spec.count
    a, b = _match(found, *objs[0]), _match(found, *objs[1])
    if spec.category in ("two", "binding"):
        return bool(a) and bool(b) and (len(a) + len(b) >= 2 if objs[0] != objs[1] else len(a) >= 2)
    if spec.category == "position":
        ux, uy = RELATIONS[spec.relation]
        return any(
            (ux and (p.cx - q.cx) * ux > 0 and abs(p.cx - q.cx) > abs(p.cy - q.cy))
            or (uy and (p.cy - q.cy) * uy > 0 and abs(p.cy - q.cy) > abs(p.cx - q.cx))
            for p in a
            for q in b
            if p is not q
        )
    raise ValueError(f"unknown category {spec.category!r}")


def evaluate_images(images, specs: list[Spec]) -> dict[str, float]:
    """Accuracy per category and overall (mean of categories, as GenEval) for (B, 3, H, W) images."""
    per: dict[str, list[bool]] = {}
    for img, spec in zip(images, specs):
        per.setdefault(spec.category, []).append(judge(np.asarray(img), spec))
    table = {c: float(np.mean(v)) for c, v in per.items()}
    table["overall"] = float(np.mean(list(table.values()))) if table else 0.0
    return table


def _credit(f: Found, colour: str | None, shape: str) -> float:
    """Half for the right shape, half for the right colour (any colour when the caption names none)."""
    return 0.5 * (f.shape == shape) + 0.5 * (colour is None or f.colour == colour)


def graded(image: np.ndarray, spec: Spec) -> float:
    """A finer score in [0, 1] than `judge`, for ranking two images of one caption (preference pairs are mostly ties
    under pass/fail on a weak generator): half for passing `judge`, half for partial credit, the mean of

    - per named object, the best credit of a distinct detected object (shape right: 1/2, colour right: 1/2);
    - counting: 1 - |exact matches - count| / count;  position: the relation between the two best-credited objects;
    - 1 / (1 + detected objects beyond the ones the caption asks for).

    So every image that passes scores above every image that fails, and among failures an image closer to the
    caption scores higher."""
    found = detect(image)
    objs = spec.objects
    terms = []
    need = spec.count if spec.category == "counting" else len(objs)
    if len(objs) == 1:
        best = max((_credit(f, *objs[0]) for f in found), default=0.0)
        terms.append(best)
        if spec.category == "counting":
            terms.append(max(0.0, 1 - abs(len(_match(found, *objs[0])) - spec.count) / spec.count))
    else:
        pairs = [(_credit(p, *objs[0]) + _credit(q, *objs[1]), p, q) for p in found for q in found if p is not q]
        pairs += [(max(_credit(f, *objs[0]), _credit(f, *objs[1])), None, None) for f in found]  # one object drawn
        best, p, q = max(pairs, key=lambda x: x[0], default=(0.0, None, None))
        terms.append(best / 2)
        if spec.category == "position":
            ux, uy = RELATIONS[spec.relation]
            ok = p is not None and (
                (ux and (p.cx - q.cx) * ux > 0 and abs(p.cx - q.cx) > abs(p.cy - q.cy))
                or (uy and (p.cy - q.cy) * uy > 0 and abs(p.cy - q.cy) > abs(p.cx - q.cx))
            )
            terms.append(float(bool(ok)))
    terms.append(1.0 / (1 + max(0, len(found) - need)))
    return 0.5 * float(judge(image, spec)) + 0.5 * float(np.mean(terms))


def colour_entropy(images, specs: list[Spec]) -> float:
    """Diversity that sees colour collapse: for each caption that names no colour (`single`, `two`), the entropy
    (bits) of the colours of every object the evaluator detects in its images (from different noise; `mixed`
    counts as a colour), averaged over those captions. 2 bits for the four colours used evenly, 0 when every image
    paints one colour. Captions with fewer than two detected objects are skipped; nan when none is left. (The RMS
    pixel distance between images of one caption rose under visible colour collapse: brighter, larger blobs.)"""
    colours: dict[tuple, list[str]] = {}
    for img, spec in zip(images, specs):
        if all(c is None for c, _ in spec.objects):
            colours.setdefault(spec.objects, []).extend(f.colour for f in detect(np.asarray(img)))
    ent = []
    for found in colours.values():
        if len(found) >= 2:
            _, counts = np.unique(found, return_counts=True)
            q = counts / counts.sum()
            ent.append(float(-(q * np.log2(q)).sum()))
    return float(np.mean(ent)) if ent else float("nan")

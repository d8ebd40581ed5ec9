"""Rule-based evaluator for the toy scenes: colour segmentation, connected components, shape by fill ratio,
centroids. Exact on rendered scenes; never used as a training reward.

Two verdicts per image (`assess`):
  passed   GenEval-style (`judge`): the objects the caption names are there; other objects are ignored, so "a green
           circle" drawn as four green blobs passes.
  strict   passed, and nothing else: exactly as many objects as the caption names (counted by the same detector)
           and no artefact, i.e. at most MAX_SPECKS specks. A speck is a faint or small mark outside the detected
           objects (a component of pixels at least SPECK_LEVEL bright, of SPECK_MIN_AREA pixels or more, beyond
           SPECK_MARGIN pixels of every object): the detector's own thresholds (FOREGROUND, MIN_AREA) never see a
           lattice of faint specks, this rule does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leapalign_fast.toy.scenes import COLOURS, RELATIONS, Spec

MIN_AREA = 20  # pixels; smaller blobs are noise
COLOUR_TOL = 0.45  # max RGB distance to a palette colour
FOREGROUND = 0.5  # min brightest channel of an object pixel (every palette colour has a channel >= 0.8)
MIN_PURITY = 0.5  # min fraction of an object's pixels near its colour; below: "mixed"
SPECK_LEVEL = 0.15  # min brightest channel of a speck pixel: a faint mark, far below FOREGROUND
SPECK_MIN_AREA = 3  # pixels; a speck is at least this large (lone bright pixels are sampling noise)
SPECK_MARGIN = 3  # pixels around a detected object that belong to its soft edge, not to a speck
MAX_SPECKS = 2  # more specks than this in one image is an artefact (the strict score fails it)


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
    return _detect(np.asarray(image, dtype=np.float32))[0]


def object_components(img: np.ndarray) -> list[np.ndarray]:
    """(y, x) pixels of each object `detect` finds in a (3, H, W) image: the foreground components of MIN_AREA or
    more pixels."""
    return [pix for pix in _components(img.max(0) >= FOREGROUND) if len(pix) >= MIN_AREA]


def _detect(img: np.ndarray) -> tuple[list[Found], np.ndarray]:
    """`detect`, with the (H, W) mask of the detected objects' pixels."""
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
    dist = np.linalg.norm(img[None] - palette[:, :, None, None], axis=1)  # (K, H, W)
    nearest = np.where(dist.min(0) < COLOUR_TOL, dist.argmin(0), -1)  # (H, W) palette index, -1 for none
    names = list(COLOURS)
    found = []
    objects = np.zeros(img.shape[1:], dtype=bool)
    for pix in object_components(img):
        objects[pix[:, 0], pix[:, 1]] = True
        votes = np.bincount(nearest[pix[:, 0], pix[:, 1]] + 1, minlength=len(names) + 1)[1:]
        colour = names[int(votes.argmax())] if votes.max() >= MIN_PURITY * len(pix) else "mixed"
        found.append(
            Found(colour, classify_shape(pix), float(pix[:, 1].mean()) + 0.5, float(pix[:, 0].mean()) + 0.5, len(pix))
        )
    return found, objects


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Boolean (H, W) mask grown by r pixels (a (2r+1)-square neighbourhood)."""
    h, w = mask.shape
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def specks(image: np.ndarray, objects: np.ndarray | None = None) -> int:
    """Faint or small marks outside the detected objects of a (3, H, W) image: components of pixels whose brightest
    channel is at least SPECK_LEVEL, of at least SPECK_MIN_AREA pixels, farther than SPECK_MARGIN from every
    detected object (`objects`: their pixel mask; detected here when None). Blobs too small for an object (under
    MIN_AREA) count as specks too. A clean render has none; a lattice of faint dots has one per dot."""
    img = np.asarray(image, dtype=np.float32)
    if objects is None:
        objects = _detect(img)[1]
    mask = (img.max(0) >= SPECK_LEVEL) & ~_dilate(objects, SPECK_MARGIN)
    return sum(len(pix) >= SPECK_MIN_AREA for pix in _components(mask))


def _match(found: list[Found], colour: str | None, shape: str) -> list[Found]:
    return [f for f in found if f.shape == shape and (colour is None or f.colour == colour)]


def judge(image: np.ndarray, spec: Spec) -> bool:
    """Does the image show what the spec asks for (GenEval-style, per category)?"""
    return _judge(detect(image), spec)


def named_objects(spec: Spec) -> int:
    """How many objects the caption names: its count for counting, one per noun otherwise."""
    return spec.count if spec.category == "counting" else len(spec.objects)


@dataclass(frozen=True)
class Assessment:
    """Everything the evaluator says about one image of one caption."""

    passed: bool  # GenEval-style (`judge`)
    strict: bool  # passed, exactly the named objects and no artefact
    objects: int  # objects detected
    extra: int  # objects beyond the ones the caption names
    specks: int  # faint or small marks outside the objects (`specks`)

    @property
    def artefact(self) -> bool:
        return self.specks > MAX_SPECKS


def assess(image: np.ndarray, spec: Spec) -> Assessment:
    """The GenEval-style verdict, the strict one and the counts behind them (see the module docstring)."""
    img = np.asarray(image, dtype=np.float32)
    found, objects = _detect(img)
    passed = _judge(found, spec)
    extra = max(0, len(found) - named_objects(spec))
    n = specks(img, objects)
    strict = passed and len(found) == named_objects(spec) and n <= MAX_SPECKS
    return Assessment(passed, strict, len(found), extra, n)


def _judge(found: list[Found], spec: Spec) -> bool:
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


# summarise()'s image-level columns, and whether more is better (validation's best checkpoint; None: no direction)
METRICS = {
    "overall": True,  # GenEval-style pass rate, mean of the categories
    "strict": True,  # strict pass rate, mean of the categories
    "objects": None,  # objects detected per image
    "extra": False,  # objects beyond the caption's, per image
    "empty": False,  # fraction of images with no object
    "specks": False,  # specks per image
    "artefact": False,  # fraction of images with more than MAX_SPECKS specks
}


def summarise(assessments: list[Assessment], specs: list[Spec]) -> dict[str, float]:
    """Per category `<category>` (GenEval-style) and `strict/<category>`; `overall` and `strict` (means of the
    categories, as GenEval); `objects`, `extra`, `specks` per image, `empty` and `artefact` fractions of images."""
    per: dict[str, list[Assessment]] = {}
    for a, spec in zip(assessments, specs):
        per.setdefault(spec.category, []).append(a)
    table = {c: float(np.mean([a.passed for a in v])) for c, v in per.items()}
    table.update({f"strict/{c}": float(np.mean([a.strict for a in v])) for c, v in per.items()})
    table["overall"] = float(np.mean([table[c] for c in per])) if per else 0.0
    table["strict"] = float(np.mean([table[f"strict/{c}"] for c in per])) if per else 0.0
    table["objects"] = float(np.mean([a.objects for a in assessments])) if assessments else 0.0
    table["extra"] = float(np.mean([a.extra for a in assessments])) if assessments else 0.0
    table["empty"] = float(np.mean([a.objects == 0 for a in assessments])) if assessments else 0.0
    table["specks"] = float(np.mean([a.specks for a in assessments])) if assessments else 0.0
    table["artefact"] = float(np.mean([a.artefact for a in assessments])) if assessments else 0.0
    return table


def evaluate_strict(images, specs: list[Spec]) -> dict[str, float]:
    """`summarise` of every image's `assess`ment, for (B, 3, H, W) images."""
    return summarise([assess(np.asarray(img), spec) for img, spec in zip(images, specs)], specs)


def _credit(f: Found, colour: str | None, shape: str) -> float:
    """Half for the right shape, half for the right colour (any colour when the caption names none)."""
    return 0.5 * (f.shape == shape) + 0.5 * (colour is None or f.colour == colour)


def graded(image: np.ndarray, spec: Spec, strict: bool = False) -> float:
    """A finer score in [0, 1] than `judge`, for ranking two images of one caption (preference pairs are mostly ties
    under pass/fail on a weak generator): half for passing `judge` (with `strict`: the strict pass of `assess`),
    half for partial credit, the mean of

    - per named object, the best credit of a distinct detected object (shape right: 1/2, colour right: 1/2);
    - counting: 1 - |exact matches - count| / count;  position: the relation between the two best-credited objects;
    - 1 / (1 + detected objects beyond the ones the caption asks for);
    - with `strict`: 1 / (1 + specks), so a faint lattice costs credit too.

    So every image that passes scores above every image that fails, and among failures an image closer to the
    caption scores higher. `strict` is the preference annotator that wants what the strict score wants."""
    img = np.asarray(image, dtype=np.float32)
    found, objects = _detect(img)
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
    passed = _judge(found, spec)
    if strict:
        n = specks(img, objects)
        terms.append(1.0 / (1 + n))
        passed = passed and len(found) == need and n <= MAX_SPECKS
    return 0.5 * float(passed) + 0.5 * float(np.mean(terms))


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

"""Seeded synthetic visual-question task the built-in model is trained and tested on.

Scenes are 96x96 RGB images with 3-6 small objects (shape, colour, size) placed in the cells of a 3x3
grid over a cluttered grey background. Every question needs specific image regions, so dropping the
wrong visual tokens loses the answer -- the property that makes token compression matter.

Determinism: sample ``i`` of a split is drawn from ``numpy.random.default_rng([SPLIT_SEEDS[split], seed, i])``,
so splits never overlap and any sample can be regenerated on its own.

Scenes live in 96-unit coordinates; ``size`` renders them natively at another resolution (224 for the
DeiT-based built-in model): every shape, stroke and speck is drawn at that size, not upscaled, and the same
sample index gives the same scene, question and answer at every size (the sensor noise is drawn at the new
size from a copy of the random stream, so the stream itself advances exactly as at 96).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserInputError

IMAGE_SIZE = 96
PATCH_SIZE = 8
GRID = 3
CELL = IMAGE_SIZE // GRID

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 185, 55),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 30),
    "purple": (160, 50, 210),
    "cyan": (30, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = {"small": 5.0, "large": 7.5}  # half-extent in pixels: 10 or 15 px objects, 2x2..3x3 patches
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three")
RELATIONS = ("left of", "right of", "above", "below")
QUESTION_TYPES = ("color", "shape", "count", "exist", "relation")
ANSWERS: tuple[str, ...] = (*COLOURS, *SHAPES, *NUMBERS, "yes", "no")
SPLIT_SEEDS = {"train": 1001, "val": 2002, "test": 3003}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, raster order over the 3x3 grid
    cx: float
    cy: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class VQASample:
    """One image-question-answer triple, with the ground truth needed to analyse token selection."""

    image: np.ndarray  # (96, 96, 3) uint8
    question: str
    answer: str
    qtype: str
    objects: list[SceneObject] = field(default_factory=list)
    referents: tuple[int, ...] = ()  # indices into ``objects`` of the objects the question is about
    index: int = 0
    split: str = "test"
    seed: int = 0

    @property
    def size(self) -> int:
        """The side of ``image`` in pixels (96, or the ``size`` it was rendered at)."""
        return int(self.image.shape[0])

    def patch_coverage(self, patch_size: int = PATCH_SIZE) -> np.ndarray:
        """(objects, H/p, W/p) fraction of each patch of ``image`` that each object covers."""
        size = self.size
        g = size // patch_size
        cov = [_shape_mask(o, size).reshape(g, patch_size, g, patch_size).mean(axis=(1, 3)) for o in self.objects]
        return np.stack(cov) if cov else np.zeros((0, g, g), np.float32)

    def object_patch_mask(self, patch_size: int = PATCH_SIZE) -> np.ndarray:
        """(H/p, W/p) bool grid: patches an object's pixels fall into."""
        return (self.patch_coverage(patch_size) > 0.02).any(axis=0)


def _shape_mask(obj: SceneObject, size: int, supersample: int = 2) -> np.ndarray:
    """Anti-aliased coverage in [0,1] of one object in a ``size`` x ``size`` image (scene units scaled by
    size / 96), rendered by supersampling its bounding box."""
    k = size / IMAGE_SIZE
    r, cx, cy = SIZES[obj.size] * k, obj.cx * k, obj.cy * k
    out = np.zeros((size, size), np.float32)
    x0, x1 = int(np.floor(cx - r - 1)), int(np.ceil(cx + r + 1))
    y0, y1 = int(np.floor(cy - r - 1)), int(np.ceil(cy + r + 1))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    s = supersample
    ys = (np.arange(y0 * s, y1 * s) + 0.5) / s - cy
    xs = (np.arange(x0 * s, x1 * s) + 0.5) / s - cx
    dy, dx = np.meshgrid(ys, xs, indexing="ij")
    if obj.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif obj.shape == "square":
        inside = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif obj.shape == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= r * 1.1
    elif obj.shape == "cross":
        arm = r * 0.38
        inside = ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    elif obj.shape == "triangle":  # apex up
        inside = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.62)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(obj.shape)
    cov = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = cov
    return out


def _background(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Low-saturation clutter: a smooth grey field, grey strokes and specks, sensor noise (drawn in scene units,
    rasterised at ``size``)."""
    import copy

    k = size / IMAGE_SIZE
    coarse = rng.uniform(0.25, 0.6, size=(4, 4)).astype(np.float32)
    idx = np.linspace(0, 3, size)
    i0 = np.floor(idx).astype(int).clip(0, 2)
    t = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - t) + coarse[i0 + 1] * t  # (96, 4)
    u = (idx - i0)[None, :]
    field_ = rows[:, i0] * (1 - u) + rows[:, i0 + 1] * u
    img = np.repeat(field_[..., None], 3, axis=2)
    img += rng.normal(0, 0.03, size=(1, 1, 3)).astype(np.float32)  # faint global tint
    for _ in range(rng.integers(6, 12)):  # thin strokes, rasterised inside their bounding box
        x0, y0 = rng.uniform(0, IMAGE_SIZE, 2) * k
        ang = rng.uniform(0, np.pi)
        width, half_len = rng.uniform(0.5, 1.2) * k, rng.uniform(8, 30) * k
        ex, ey = abs(np.cos(ang)) * half_len + 2 * k, abs(np.sin(ang)) * half_len + 2 * k
        ya, yb = int(max(y0 - ey, 0)), int(min(y0 + ey + 1, size))
        xa, xb = int(max(x0 - ex, 0)), int(min(x0 + ex + 1, size))
        yy, xx = np.mgrid[ya:yb, xa:xb]
        dist = np.abs((xx - x0) * np.sin(ang) - (yy - y0) * np.cos(ang))
        along = np.abs((xx - x0) * np.cos(ang) + (yy - y0) * np.sin(ang))
        img[ya:yb, xa:xb][(dist < width) & (along < half_len)] = rng.uniform(0.15, 0.8)
    for _ in range(rng.integers(15, 30)):  # specks
        x, y = (rng.integers(0, IMAGE_SIZE - 2, 2) * k).round().astype(int)
        w = int(round(2 * k))
        img[y : y + w, x : x + w] = rng.uniform(0.1, 0.85)
    if size == IMAGE_SIZE:
        img += rng.normal(0, 0.025, size=img.shape).astype(np.float32)
    else:  # noise at this size from a copy of the stream; the stream advances as at 96
        img += np.random.Generator(copy.deepcopy(rng.bit_generator)).normal(0, 0.025, size=img.shape).astype(np.float32)
        rng.normal(0, 0.025, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return img


def _render(objects: list[SceneObject], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    img = _background(rng, size)
    for obj in objects:
        cov = _shape_mask(obj, size)[..., None]
        colour = np.array(COLOURS[obj.colour], np.float32) / 255.0
        shade = rng.uniform(0.85, 1.05)
        img = img * (1 - cov) + np.clip(colour * shade, 0, 1) * cov
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _random_objects(rng: np.random.Generator) -> list[SceneObject]:
    n = int(rng.integers(3, 7))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    combos = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)  # (colour, shape) unique per scene
    colours = list(COLOURS)
    objects = []
    for cell, combo in zip(cells, combos):
        size = str(rng.choice(list(SIZES)))
        margin = CELL / 2 - SIZES[size] - 1.5
        cx = (cell % GRID + 0.5) * CELL + rng.uniform(-margin, margin)
        cy = (cell // GRID + 0.5) * CELL + rng.uniform(-margin, margin)
        objects.append(SceneObject(SHAPES[combo % len(SHAPES)], colours[combo // len(SHAPES)], size, int(cell), cx, cy))
    return objects


def _relation_holds(a: SceneObject, b: SceneObject, rel: str) -> bool | None:
    """Grid-cell relation; None when the relation is not decided by the cells (same column/row)."""
    ca, ra, cb, rb = a.cell % GRID, a.cell // GRID, b.cell % GRID, b.cell // GRID
    if rel in ("left of", "right of"):
        return None if ca == cb else (ca < cb) == (rel == "left of")
    return None if ra == rb else (ra < rb) == (rel == "above")


def _candidate_questions(objects: list[SceneObject], qtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """All (question, answer, referents) triples of one type that the scene answers unambiguously."""
    out: list[tuple[str, str, tuple[int, ...]]] = []
    if qtype == "color":
        for shape in SHAPES:
            match = [i for i, o in enumerate(objects) if o.shape == shape]
            if len(match) == 1:
                out.append((f"what color is the {shape} ?", objects[match[0]].colour, tuple(match)))
    elif qtype == "shape":
        for i, o in enumerate(objects):
            out.append((f"what shape is at the {POSITIONS[o.cell]} ?", o.shape, (i,)))
    elif qtype == "count":
        for colour in COLOURS:
            match = tuple(i for i, o in enumerate(objects) if o.colour == colour)
            if len(match) < len(NUMBERS):
                out.append((f"how many {colour} objects are there ?", NUMBERS[len(match)], match))
    elif qtype == "exist":
        for colour in COLOURS:
            for shape in SHAPES:
                match = tuple(i for i, o in enumerate(objects) if (o.colour, o.shape) == (colour, shape))
                out.append((f"is there a {colour} {shape} ?", "yes" if match else "no", match))
    elif qtype == "relation":
        for i, a in enumerate(objects):
            for j, b in enumerate(objects):
                if i == j:
                    continue
                for rel in RELATIONS:
                    holds = _relation_holds(a, b, rel)
                    if holds is not None:
                        out.append((f"is the {a.name} {rel} the {b.name} ?", "yes" if holds else "no", (i, j)))
    return out


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < IMAGE_SIZE // 2:
        raise UserInputError(f"synthetic image size {size!r}; accepted: an integer >= {IMAGE_SIZE // 2}")
    return int(size)


def generate_sample(index: int, split: str = "test", seed: int = 0, qtype: str | None = None,
                    size: int = IMAGE_SIZE) -> VQASample:
    """Sample ``index`` of ``split``; the question type cycles so every type is equally frequent. ``size``: the
    side the image is rendered at (the scene, question and answer do not depend on it).

    Answers are balanced within a type: the answer class is drawn uniformly among those the scene offers,
    then a question with that answer (scenes are redrawn until the drawn class is available).
    """
    if split not in SPLIT_SEEDS:
        raise UserInputError(f"unknown split {split!r}; accepted: {', '.join(SPLIT_SEEDS)}")
    qtype = qtype or QUESTION_TYPES[index % len(QUESTION_TYPES)]
    if qtype not in QUESTION_TYPES:
        raise UserInputError(f"unknown question type {qtype!r}; accepted: {', '.join(QUESTION_TYPES)}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], seed, index])
    answer_space = {"color": list(COLOURS), "shape": list(SHAPES), "count": list(NUMBERS)}.get(qtype, ["yes", "no"])
    wanted = str(rng.choice(answer_space))
    while True:
        objects = _random_objects(rng)
        pairs = [p for p in _candidate_questions(objects, qtype) if p[1] == wanted]
        if pairs:
            question, answer, referents = pairs[int(rng.integers(len(pairs)))]
            return VQASample(_render(objects, rng, _check_size(size)), question, answer, qtype, objects, referents,
                             index, split, seed)


def generate_scene(index: int, split: str = "train", seed: int = 0, per_type: int = 2,
                   visible: int | None = None, size: int = IMAGE_SIZE) -> tuple[list[SceneObject], list[VQASample]]:
    """One scene and ``per_type`` questions of every type about it (training packs them into one sequence).

    With ``visible``, the questions are about that many of the scene's objects only (drawn at random; the
    training curriculum shows the model just their tokens). Within a type, each question's answer class is drawn
    uniformly among the classes the (visible) scene offers that were not drawn yet, so a scene never repeats a
    question and no answer is predictable from the question alone. The first count question's answer is drawn
    uniformly from every possible count first and the scene redrawn until it occurs, as ``generate_sample``
    does; otherwise three-of-a-colour scenes, and with them the answer "three", would be rare.
    Returns (every object, the questions).
    """
    if split not in SPLIT_SEEDS:
        raise UserInputError(f"unknown split {split!r}; accepted: {', '.join(SPLIT_SEEDS)}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], seed, index, per_type])
    count = str(rng.choice(NUMBERS[:None if visible is None else visible + 1]))  # scenes are redrawn until it occurs
    while True:
        objects = _random_objects(rng)
        shown = objects
        if visible is not None and visible < len(objects):
            shown = [objects[i] for i in sorted(rng.choice(len(objects), size=visible, replace=False))]
        if any(a == count for _, a, _ in _candidate_questions(shown, "count")):
            break
    image = _render(objects, rng, _check_size(size))
    out = []
    for qtype in QUESTION_TYPES:
        by_answer: dict[str, list] = {}
        for triple in _candidate_questions(shown, qtype):
            by_answer.setdefault(triple[1], []).append(triple)
        others = [a for a in sorted(by_answer) if not (qtype == "count" and a == count)]
        drawn = list(rng.choice(others, size=min(per_type, len(by_answer)) - (qtype == "count"), replace=False))
        for answer in ([count] if qtype == "count" else []) + drawn:
            pool = by_answer[str(answer)]
            question, answer, referents = pool[int(rng.integers(len(pool)))]
            out.append(VQASample(image, question, answer, qtype, shown, referents, index, split, seed))
    return objects, out


def generate_dataset(n: int, split: str = "test", seed: int = 0, start: int = 0,
                     size: int = IMAGE_SIZE) -> list[VQASample]:
    return [generate_sample(i, split, seed, size=size) for i in range(start, start + n)]


def question_vocabulary() -> list[str]:
    """Every word a question or answer of this task can contain (for the word-level tokenizer)."""
    words = {"what", "color", "is", "the", "shape", "at", "how", "many", "objects", "are", "there", "?", "a"}
    for text in (*COLOURS, *SHAPES, *POSITIONS, *NUMBERS, *RELATIONS, "yes", "no"):
        words.update(text.split())
    return sorted(words)


def to_pixels(samples: list[VQASample], size: int | None = None):
    """(B, 3, S, S) float tensor in [0, 1] of the samples' images. With ``size``, a sample rendered at another
    size is rendered again at that one (the same scene, question and answer: ``generate_sample``'s samples)."""
    import torch

    if size is not None:
        samples = [s if s.size == size else _rerender(s, size) for s in samples]
    return torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255.0


def _rerender(sample: VQASample, size: int) -> VQASample:
    again = generate_sample(sample.index, sample.split, sample.seed, sample.qtype, size)
    if (again.question, again.answer) != (sample.question, sample.answer):
        raise UserInputError(f"synthetic sample {sample.index} ({sample.split}) is not generate_sample's, so it "
                             f"cannot be rendered again at {size} px; accepted: generate_dataset(..., size={size})")
    return again

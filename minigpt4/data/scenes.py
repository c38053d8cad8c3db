"""Synthetic scenes: coloured shapes at known places on a plain background.

Every scene is drawn from a `random.Random`, so a seed gives the same image and the same text on
every machine. The ground truth (which shape, which colour, which cell of a 3×3 grid, its box) is
kept beside the image; captions, detailed descriptions, questions and POPE-style yes/no probes are
all written from it. Training tests, the offline evaluation set and the lite model's training data
use these scenes, because they need images whose content is known exactly.

Shapes are drawn without anti-aliasing, so every pixel of an object has exactly its colour (before
any JPEG compression).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from minigpt4.lite.vocabulary import COLOURS, POSITIONS

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (215, 200, 165),
    "light blue": (170, 200, 230),
}

MAX_OBJECTS = len(POSITIONS)
# The kinds of `followup` questions.
FOLLOWUP_KINDS = ("colour", "position", "count")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. `box` is its bounding box (x0, y0, x1, y1) in pixels, end exclusive."""

    shape: str
    colour: str
    position: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    background: str


def cell_box(position: str, size: int) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) of a grid cell, end exclusive."""
    index = POSITIONS.index(position)
    row, col = divmod(index, 3)
    edges = [round(size * k / 3) for k in range(4)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def render_scene(rng: random.Random, size: int = 224, n_objects: int | None = None) -> Scene:
    """Draw 1–4 (or `n_objects`) shapes, each in its own grid cell, no two alike in shape and colour."""
    if n_objects is None:
        n_objects = rng.randint(1, 4)
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be between 1 and {MAX_OBJECTS}, got {n_objects}")
    if size < 48:
        raise ValueError(f"size must be at least 48 pixels, got {size}")
    background = rng.choice(sorted(BACKGROUNDS))
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLOURS], n_objects)
    cells = sorted(rng.sample(range(MAX_OBJECTS), n_objects))
    objects = []
    for (shape, colour), cell in zip(kinds, cells, strict=True):
        position = POSITIONS[cell]
        box = _draw_shape(draw, rng, shape, COLOURS[colour], cell_box(position, size))
        objects.append(SceneObject(shape, colour, position, box))
    return Scene(image=image, objects=objects, background=background)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    rng: random.Random,
    shape: str,
    fill: tuple[int, int, int],
    cell: tuple[int, int, int, int],
) -> tuple[int, int, int, int]:
    """Draw `shape` inside `cell` with a random size and offset; return the box of its pixels."""
    x0, y0, x1, y1 = cell
    half = min(x1 - x0, y1 - y0) / 2
    r = half * rng.uniform(0.55, 0.8)
    slack = half - r - 1
    cx = (x0 + x1) / 2 + rng.uniform(-slack, slack)
    cy = (y0 + y1) / 2 + rng.uniform(-slack, slack)
    points = _outline(shape, cx, cy, r)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(points, fill=fill)
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return (math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)) + 1, math.ceil(max(ys)) + 1)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of a shape inscribed in the circle (cx, cy, r); a circle's bounding square."""

    def ring(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
        step = 360 / n
        return [
            (
                cx + radius * math.cos(math.radians(start_deg + k * step)),
                cy + radius * math.sin(math.radians(start_deg + k * step)),
            )
            for k in range(n)
        ]

    if shape == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        return ring(4, r, 45)
    if shape == "diamond":
        return ring(4, r, -90)
    if shape == "triangle":
        return ring(3, r, -90)
    if shape == "star":
        outer, inner = ring(5, r, -90), ring(5, r * 0.45, -54)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        w = r * 0.35
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def number_word(n: int) -> str:
    return _NUMBER_WORDS[n]


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """A short stage-1 style caption: "a red circle and a blue square"."""
    return _join([f"{_article(o.colour)} {o.name}" for o in scene.objects])


def describe(scene: Scene) -> str:
    """A detailed stage-2 style description: the count, the background, then each object and its place."""
    n = len(scene.objects)
    noun = "shape" if n == 1 else "shapes"
    sentences = [f"The image shows {number_word(n)} {noun} on a plain {scene.background} background."]
    for obj in scene.objects:
        sentences.append(f"{_article(obj.colour).capitalize()} {obj.name} is in the {obj.position}.")
    if n < MAX_OBJECTS:
        sentences.append("The rest of the picture is empty.")
    return " ".join(sentences)


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Short-answer questions: colour, shape and position of every object, and two counts.

    Objects are named by place or by shape and colour, which are unique in a scene, so every question
    has one right answer. Counts are answered with digits, as in VQAv2.
    """
    qa: list[tuple[str, str]] = []
    for obj in scene.objects:
        qa.append((f"What colour is the shape in the {obj.position}?", obj.colour))
        qa.append((f"What shape is in the {obj.position}?", obj.shape))
        qa.append((f"Where is the {obj.name}?", obj.position))
    qa.append(("How many shapes are in the image?", str(len(scene.objects))))
    # Half the time ask about a shape that is there, so "0" is not the usual answer.
    shape = rng.choice([o.shape for o in scene.objects] if rng.random() < 0.5 else SHAPES)
    count = sum(o.shape == shape for o in scene.objects)
    qa.append((f"How many {plural(shape)} are in the image?", str(count)))
    return qa


# The kinds of `questions`, by how each question starts; anything else is a count.
_QUESTION_KINDS = (("What colour", "colour"), ("What shape", "shape"), ("Where", "position"))


def question_kind(question: str) -> str:
    """ "colour", "shape", "position" or "count": the kind of a question that `questions` wrote."""
    return next((kind for prefix, kind in _QUESTION_KINDS if question.startswith(prefix)), "count")


def answer_options(question: str) -> tuple[str, ...]:
    """Every answer a question of this kind can have (its closed answer set)."""
    kind = question_kind(question)
    if kind == "colour":
        return tuple(COLOURS)
    if kind == "shape":
        return SHAPES
    if kind == "position":
        return POSITIONS
    return tuple(str(n) for n in range(MAX_OBJECTS + 1))


def followup(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """A follow-up question of `kind` ("colour", "position", "count") about one object, and its answer.

    The object is named by its shape alone when no other object has that shape, else by its place
    (colour questions) or its colour (position questions), so every question has one right answer.
    Count questions ask, half the time, about a shape that may be absent, so "1" is not the usual answer.
    """
    obj = rng.choice(scene.objects)
    unique = sum(o.shape == obj.shape for o in scene.objects) == 1
    if kind == "colour":
        where = "" if unique else f" in the {obj.position}"
        return f"What colour is the {obj.shape}{where}?", obj.colour
    if kind == "position":
        return f"Where is the {obj.shape if unique else obj.name}?", obj.position
    if kind == "count":
        shape = obj.shape if rng.random() < 0.5 else rng.choice(SHAPES)
        count = sum(o.shape == shape for o in scene.objects)
        return f"How many {plural(shape)} are there?", str(count)
    raise ValueError(f"unknown follow-up kind {kind!r}; known: {', '.join(FOLLOWUP_KINDS)}")


def pope_probes(
    scene: Scene, rng: random.Random, n_per_answer: int = 3, adversarial: bool = False
) -> list[tuple[str, str]]:
    """Balanced yes/no probes, POPE style: "Is there a green star in the image?" → "yes" / "no".

    Up to `n_per_answer` present objects give "yes"; as many absent (shape, colour) pairs give "no".
    With `adversarial`, the absent pairs share a shape or a colour with a present object when they can
    (the hard negatives of POPE's adversarial setting). The order is shuffled by `rng`.
    """
    present = {(o.shape, o.colour) for o in scene.objects}
    yes = rng.sample(sorted(present), min(n_per_answer, len(present)))
    absent = sorted({(s, c) for s in SHAPES for c in COLOURS} - present)
    if adversarial:
        near = [(s, c) for s, c in absent if any(s == ps or c == pc for ps, pc in present)]
        no = rng.sample(near, min(len(yes), len(near)))
        no += rng.sample([p for p in absent if p not in near], len(yes) - len(no))
    else:
        no = rng.sample(absent, len(yes))
    probes = [(f"Is there {_article(c)} {c} {s} in the image?", "yes") for s, c in yes]
    probes += [(f"Is there {_article(c)} {c} {s} in the image?", "no") for s, c in no]
    rng.shuffle(probes)
    return probes

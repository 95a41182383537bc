"""The demo's synthetic world: scenes of one to four shapes of one colour and one kind, on
canvases of many aspect ratios, with the captions and questions that describe them.

One scene is a colour, a kind and a count, so every question has exactly one right answer and
the chance level is known (1/4 for each of the three questions). Shapes are sized from the
canvas's long side, which the image processor maps to `image_size`: a shape covers the same
number of patches at every aspect ratio, and an unseen aspect ratio changes only the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 40, 40), "green": (35, 160, 60), "blue": (40, 80, 215), "yellow": (230, 190, 20)}
KINDS = ("circle", "square", "triangle", "cross")
COUNT_WORDS = ("one", "two", "three", "four")
TRAIN_ASPECTS = ((1, 3), (1, 2), (2, 3), (1, 1), (3, 2), (2, 1), (3, 1))  # width : height
UNSEEN_ASPECTS = ((1, 4), (4, 1))
SUPERSAMPLE = 4  # drawn larger, then downsampled: anti-aliased edges like a photograph's

QUESTIONS = {
    "colour": ("What color are the shapes?", "Which color is used for the shapes?", "What is the color of the objects?"),
    "kind": ("What shape are the objects?", "Which kind of shape is shown?", "What shape do you see?"),
    "count": ("How many shapes are there?", "How many objects are in the picture?", "Count the shapes."),
}


@dataclass(frozen=True)
class Scene:
    colour: str
    kind: str
    count: int
    aspect: tuple[int, int]
    seed: int

    @property
    def answers(self) -> dict[str, str]:
        return {"colour": self.colour, "kind": self.kind, "count": COUNT_WORDS[self.count - 1]}

    def caption(self, rng: np.random.Generator) -> str:
        noun = self.kind if self.count == 1 else self.kind + ("es" if self.kind.endswith("s") else "s")
        number = "a" if self.count == 1 else COUNT_WORDS[self.count - 1]
        where = {True: "a tall", False: "a wide"}[self.aspect[1] > self.aspect[0]] if self.aspect[0] != self.aspect[1] else "a square"
        patterns = (
            f"{number} {self.colour} {noun}.",
            f"{number} {self.colour} {noun} on {where} canvas.",
            f"a picture of {number} {self.colour} {noun}.",
            f"there {'is' if self.count == 1 else 'are'} {number} {self.colour} {noun} in this image.",
        )
        return str(patterns[rng.integers(len(patterns))])

    def questions(self, rng: np.random.Generator) -> list[tuple[str, str, str]]:
        """(question type, question, answer) for all three questions, in random order."""
        answers = self.answers
        kinds = list(QUESTIONS)
        rng.shuffle(kinds)
        return [(k, str(QUESTIONS[k][rng.integers(len(QUESTIONS[k]))]), answers[k]) for k in kinds]


def sample_scene(rng: np.random.Generator, aspects, seed: int) -> Scene:
    return Scene(
        colour=str(rng.choice(list(COLOURS))),
        kind=str(rng.choice(KINDS)),
        count=int(rng.integers(1, len(COUNT_WORDS) + 1)),
        aspect=tuple(aspects[rng.integers(len(aspects))]),
        seed=seed,
    )


def aspect_name(aspect: tuple[int, int]) -> str:
    """(1, 4) -> "1:4", width first: how splits, reports and annotations name an aspect ratio."""
    return f"{aspect[0]}:{aspect[1]}"


def canvas_size(aspect: tuple[int, int], long_side: int) -> tuple[int, int]:
    w, h = aspect
    scale = long_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def render(scene: Scene, long_side: int) -> Image.Image:
    """The scene as an RGB image whose longest side is `long_side` pixels."""
    rng = np.random.default_rng(scene.seed)
    width, height = canvas_size(scene.aspect, long_side * SUPERSAMPLE)
    background = tuple(int(v) for v in rng.integers(225, 256, 3))
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    size = max(width, height) * 0.2  # a shape's side; at 4:1 the layout shrinks shapes that do not fit
    for cx, cy, s in _layout(rng, scene.count, width, height, size):
        _draw(draw, scene.kind, cx, cy, s, _jitter(COLOURS[scene.colour], rng))
    return img.resize(canvas_size(scene.aspect, long_side), Image.Resampling.LANCZOS)


def _jitter(rgb, rng) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in rgb)


def _layout(rng, count: int, width: int, height: int, size: float) -> list[tuple[float, float, float]]:
    """Non-overlapping centres: rejection sampling, shrinking the shapes if a canvas is crowded."""
    for attempt in range(400):
        s = size * rng.uniform(0.75, 1.0) * (0.97 ** (attempt // 40))
        half = s / 2 + s * 0.15
        if 2 * half > min(width, height):
            continue
        placed: list[tuple[float, float, float]] = []
        for _ in range(count * 30):
            x, y = rng.uniform(half, width - half), rng.uniform(half, height - half)
            if all(math.hypot(x - px, y - py) > (s + ps) * 0.5 + s * 0.3 for px, py, ps in placed):
                placed.append((x, y, s))
                if len(placed) == count:
                    return placed
    raise RuntimeError(f"cannot place {count} shapes on a {width}x{height} canvas")


def _draw(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, s: float, fill) -> None:
    r = s / 2
    if kind == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif kind == "square":
        draw.rectangle([x - r * 0.9, y - r * 0.9, x + r * 0.9, y + r * 0.9], fill=fill)
    elif kind == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    elif kind == "cross":
        t = r * 0.35
        draw.rectangle([x - r, y - t, x + r, y + t], fill=fill)
        draw.rectangle([x - t, y - r, x + t, y + r], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def chance_level() -> float:
    """Every question type has four equally likely answers."""
    return float(np.mean([1 / len(COLOURS), 1 / len(KINDS), 1 / len(COUNT_WORDS)]))

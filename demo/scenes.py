"""The toy world's scenes and how they look: one or two objects (shape x colour x size at one cell of a 3x3
grid) over a textured background, drawn as 64x64 images. demo/world.py builds the world's files from them."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges at 64 px

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SIZES = {"small": (5.0, 6.5), "large": (8.5, 10.0)}  # radius range in pixels (a grid cell is 21 px wide)
POSITIONS = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("noise", "stripes", "checker", "gradient", "blotches")
QUESTION_CATEGORIES = ("colour", "shape", "size", "position", "count", "yes/no")

# ------------------------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str  # a nuisance: never captioned

    def attributes(self) -> dict[str, Any]:
        return {"count": len(self.objects), "background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_attributes(cls, attributes: dict[str, Any]) -> Scene:
        return cls(tuple(Obj(**o) for o in attributes["objects"]), attributes["background"])


def reading_order(objects: Sequence[Obj]) -> list[Obj]:
    """The objects sorted by their place in the position grid, top left first: a two-object scene's first and second."""
    return sorted(objects, key=lambda o: POSITIONS.index(o.position))


def sample_scene(rng: np.random.Generator, two_object_share: float = 0.5) -> Scene:
    """One or two objects in distinct grid cells; attributes uniform and independent."""
    count = 2 if rng.random() < two_object_share else 1
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = tuple(
        Obj(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
            list(SIZES)[rng.integers(len(SIZES))], POSITIONS[cell])
        for cell in cells
    )
    return Scene(objects, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])


# --------------------------------------------------------------------------------------------- rendering


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] float texture around a muted grey, so that every shape colour (white and black too) stands out."""
    n = IMAGE_SIZE
    base = rng.uniform(85, 170) + rng.uniform(-15, 15, size=3)
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    if kind == "noise":
        texture = rng.normal(0, 14, size=(n, n, 1))
    elif kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(5, 14)
        texture = 18 * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + rng.uniform(0, 6.3))[..., None]
    elif kind == "checker":
        cell = int(rng.integers(4, 9))
        texture = (14 * (((x // cell) + (y // cell)) % 2 * 2 - 1))[..., None]
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        texture = (30 * ((x - n / 2) * math.cos(angle) + (y - n / 2) * math.sin(angle)) / n)[..., None]
    elif kind == "blotches":
        coarse = Image.fromarray(rng.uniform(0, 255, size=(8, 8)).astype(np.uint8)).resize((n, n), Image.BICUBIC)
        texture = ((np.asarray(coarse, np.float64) - 127.5) / 127.5 * 25)[..., None]
    else:
        raise ValueError(f"unknown background {kind!r}; choose from {BACKGROUNDS}")
    return base + texture + rng.normal(0, 4, size=(n, n, 3))


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (cx, cy) with circumradius r, rotated by angle (radians)."""
    if shape == "square":
        points = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "diamond":
        points = [(r * math.cos(a), r * math.sin(a)) for a in (k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        points = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        points = [((r if k % 2 == 0 else 0.45 * r) * math.cos(a), (r if k % 2 == 0 else 0.45 * r) * math.sin(a))
                  for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))]
    elif shape == "cross":
        w = 0.33 * r
        points = [(w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r)]
    else:
        raise ValueError(f"no outline for shape {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + px * cos - py * sin, cy + px * sin + py * cos) for px, py in points]


def _cell_centre(position: str) -> tuple[float, float]:
    row, col = divmod(POSITIONS.index(position), 3)
    cell = IMAGE_SIZE / 3
    return (col + 0.5) * cell, (row + 0.5) * cell


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """A 64x64 RGB image of the scene. Nuisances drawn from rng: background texture, exact radius, jitter
    inside the grid cell, rotation, colour tint, pixel noise."""
    canvas = _background(scene.background, rng)
    s = SUPERSAMPLE
    for obj in scene.objects:
        r = rng.uniform(*SIZES[obj.size])
        slack = max(0.0, IMAGE_SIZE / 6 - r - 0.5)  # stay inside the cell
        cx, cy = (c + rng.uniform(-slack, slack) for c in _cell_centre(obj.position))
        mask = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
        draw = ImageDraw.Draw(mask)
        if obj.shape == "circle":
            draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
        else:
            angle = rng.uniform(-0.25, 0.25)
            draw.polygon([(px * s, py * s) for px, py in _outline(obj.shape, cx, cy, r, angle)], fill=255)
        alpha = np.asarray(mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), np.float64)[..., None] / 255.0
        colour = np.clip(np.array(COLOURS[obj.colour], np.float64) + rng.uniform(-18, 18, size=3), 0, 255)
        canvas = canvas * (1 - alpha) + colour * alpha
    canvas += rng.normal(0, 3, size=canvas.shape)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


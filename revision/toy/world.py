"""The toy world: procedural 64x64 scenes, template captions and QA, in the file formats the pipeline reads.

A scene holds one or two objects, each a shape x colour x size at one cell of a 3x3 grid, over a textured
or noisy background. Captions name every attribute of every object (several templates and synonyms), so
the caption text alone determines the scene; `parse_caption` reads the attributes back (for tests and to
score generated captions). QA answers are short canonical words ("red", "top left", "two", "yes").

    python -m revision.toy.world OUT_DIR [--seed 0] [--preset default|mini]

Files written under OUT_DIR (ids are unique across the whole world; image paths are relative to OUT_DIR):
  images/{paired,unpaired,eval}/<id>.png
  paired.jsonl            {"id", "image", "caption"}   trains the toy CLIP; an image list for image_embed.py too
  unpaired_images.jsonl   {"id", "image"}              image_embed.py --images
  unpaired_texts.jsonl    {"id", "text"}               image_embed.py --texts (scenes drawn apart from the images)
  pretrain.json           LLaVA pretraining samples keyed by the unpaired text ids
  pretrain_paired.json    the same keyed by paired image ids (the paired-pretraining upper bound)
  instruct.json           LLaVA multi-turn QA on unpaired images ("id" and "image" name the image), plus
                          a few image-free samples
  eval_images.jsonl       {"id", "image"}              held-out images
  eval_captions.jsonl     {"id", "image", "caption", "attributes"}
  eval_questions.jsonl    {"question_id", "image", "image_id", "text", "answer", "category"}
  scenes.jsonl            {"id", "split", "attributes"} for every image and caption id
  vocab.txt               every word any template can produce
  world.json              seed, sizes, counts; written last, so its presence means the world is complete

Everything is a function of (seed, sizes); each split draws from its own random stream, so changing one
split's size leaves the others as they were.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges at 64 px
WORLD_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SIZES = {"small": (5.0, 6.5), "large": (8.5, 10.0)}  # radius range in pixels (a grid cell is 21 px wide)
POSITIONS = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("noise", "stripes", "checker", "gradient", "blotches")
QUESTION_CATEGORIES = ("colour", "shape", "size", "position", "count", "yes/no")

# Surface forms: captions pick one at random; the first is the canonical word used in answers.
SHAPE_WORDS = {"circle": ("circle", "disk"), "square": ("square", "box"), "triangle": ("triangle",),
               "star": ("star",), "cross": ("cross", "plus sign"), "diamond": ("diamond", "rhombus")}
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "in the top middle"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "on the left side"),
    "middle": ("in the middle", "in the center", "in the centre"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
OBJECT_TEMPLATES = ("{size} {colour} {shape}", "{colour} {shape} that is {size}", "{size} {shape} in {colour}")
CAPTION_TEMPLATES = {
    1: ("{o1} {p1}.", "there is {o1} {p1}.", "a picture of {o1} {p1}.", "{p1} there is {o1}.",
        "an image showing {o1} {p1}."),
    2: ("{o1} {p1} and {o2} {p2}.", "there are two shapes: {o1} {p1} and {o2} {p2}.",
        "a picture of {o1} {p1} as well as {o2} {p2}.", "{p1} there is {o1}, and {p2} there is {o2}."),
}
QUESTION_TEMPLATES = {
    "colour": ("what colour is {ref}?", "what color is {ref}?", "which colour does {ref} have?"),
    "shape": ("what shape is {ref}?", "which shape is {ref}?"),
    "size": ("is {ref} small or large?", "how big is {ref}?"),
    "position": ("where is {ref}?", "in which part of the picture is {ref}?"),
}
COUNT_QUESTIONS = ("how many shapes are there?", "how many objects are in the picture?")
COLOUR_COUNT_QUESTION = "how many {colour} shapes are there?"
YES_NO_QUESTION = "is there {thing}?"
COUNT_WORDS = ("zero", "one", "two")
TEXT_ONLY_ANSWERS = ("a colour", "a shape")
TEXT_ONLY_TEMPLATES = ("is {thing} a colour or a shape?", "tell me whether {thing} is a colour or a shape.")
OBJECT_SEPARATOR = re.compile(r",? and |,? as well as ")


def _longest_first(phrases: dict[str, Sequence[str]]) -> re.Pattern:
    """One regex for every surface form (longest first, so 'at the top left' wins over 'at the top')."""
    forms = sorted((f for fs in phrases.values() for f in fs), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(f) for f in forms) + r")\b")


CANONICAL = {kind: {f: name for name, fs in words.items() for f in fs} for kind, words in
             (("shape", SHAPE_WORDS), ("colour", COLOUR_WORDS), ("size", SIZE_WORDS), ("position", POSITION_PHRASES))}
PATTERNS = {kind: _longest_first(words) for kind, words in
            (("shape", SHAPE_WORDS), ("colour", COLOUR_WORDS), ("size", SIZE_WORDS), ("position", POSITION_PHRASES))}


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


# ------------------------------------------------------------------------------------------------- text


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe_object(obj: Obj, rng: np.random.Generator) -> str:
    template = _pick(rng, OBJECT_TEMPLATES)
    return _with_article(template.format(size=_pick(rng, SIZE_WORDS[obj.size]), colour=_pick(rng, COLOUR_WORDS[obj.colour]),
                                         shape=_pick(rng, SHAPE_WORDS[obj.shape])))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every attribute of every object, in one of several wordings."""
    fields = {}
    for k, obj in enumerate(scene.objects, 1):
        fields[f"o{k}"] = describe_object(obj, rng)
        fields[f"p{k}"] = _pick(rng, POSITION_PHRASES[obj.position])
    return _pick(rng, CAPTION_TEMPLATES[len(scene.objects)]).format(**fields)


def parse_caption(text: str) -> list[dict[str, str | None]]:
    """The objects a caption describes: per object its canonical shape, colour, size and position (None where
    the text names none). Tolerant of case and punctuation, so it can score generated captions too."""
    objects = []
    for chunk in OBJECT_SEPARATOR.split(" ".join(re.sub(r"[^a-z ,]", " ", text.lower()).split())):
        found = {kind: (m.group(1) if (m := pattern.search(chunk)) else None) for kind, pattern in PATTERNS.items()}
        if any(found.values()):
            objects.append({kind: CANONICAL[kind][w] if w else None for kind, w in found.items()})
    return objects


def _matches(obj: Obj, attrs: dict[str, str]) -> bool:
    return all(getattr(obj, k) == v for k, v in attrs.items())


def _reference(scene: Scene, target: Obj, asked: str, rng: np.random.Generator) -> str | None:
    """A noun phrase naming `target` uniquely in the scene without using the asked attribute, or None."""
    options = [("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"), ("colour",),
               ("size", "colour"), ("position",)]
    unique = [keys for keys in options if asked not in keys
              and sum(_matches(o, {k: getattr(target, k) for k in keys}) for o in scene.objects) == 1]
    if not unique:
        return None
    keys = unique[rng.integers(len(unique))]
    words = [getattr(target, k) for k in ("size", "colour") if k in keys] + [target.shape if "shape" in keys else "object"]
    phrase = "the " + " ".join(words)
    return phrase + " " + _pick(rng, POSITION_PHRASES[target.position]) if "position" in keys else phrase


def _yes_no(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """'is there ...?' about a colour + shape or a shape + position; half the time about an object that is there."""
    keys = ("colour", "shape") if rng.random() < 0.5 else ("shape", "position")
    attrs = {k: getattr(scene.objects[rng.integers(len(scene.objects))], k) for k in keys}
    if rng.random() < 0.5:  # change one attribute; the answer below is computed, not assumed
        key = keys[rng.integers(2)]
        values = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)}[key]
        attrs[key] = _pick(rng, [v for v in values if v != attrs[key]])
    phrase = " ".join(attrs[k] for k in ("colour", "shape") if k in attrs)
    if "position" in attrs:
        phrase += " " + _pick(rng, POSITION_PHRASES[attrs["position"]])
    answer = "yes" if any(_matches(o, attrs) for o in scene.objects) else "no"
    return YES_NO_QUESTION.format(thing=_with_article(phrase)), answer


def _count(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    if rng.random() < 0.5:
        return _pick(rng, COUNT_QUESTIONS), COUNT_WORDS[len(scene.objects)]
    colour = scene.objects[0].colour if rng.random() < 0.5 else _pick(rng, list(COLOURS))
    return COLOUR_COUNT_QUESTION.format(colour=colour), COUNT_WORDS[sum(o.colour == colour for o in scene.objects)]


def question(scene: Scene, category: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, canonical answer) of a category about the scene; None when the scene allows no unambiguous one."""
    if category == "count":
        return _count(scene, rng)
    if category == "yes/no":
        return _yes_no(scene, rng)
    if category not in QUESTION_TEMPLATES:
        raise ValueError(f"unknown question category {category!r}; choose from {QUESTION_CATEGORIES}")
    target = scene.objects[rng.integers(len(scene.objects))]
    ref = _reference(scene, target, category, rng)
    if ref is None:
        return None
    return _pick(rng, QUESTION_TEMPLATES[category]).format(ref=ref), getattr(target, category)


def questions(scene: Scene, categories: Sequence[str], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(category, question, answer) for each category asked, in order; one the scene cannot support becomes
    the next category that it can (count and yes/no always can)."""
    out = []
    for category in categories:
        start = QUESTION_CATEGORIES.index(category)
        for step in range(len(QUESTION_CATEGORIES)):
            cat = QUESTION_CATEGORIES[(start + step) % len(QUESTION_CATEGORIES)]
            if (qa := question(scene, cat, rng)) is not None:
                out.append((cat, *qa))
                break
    return out


def qa_conversation(scene: Scene, rng: np.random.Generator, max_turns: int) -> list[dict]:
    """LLaVA turns of 1..max_turns questions of distinct categories about the scene; the image opens the first."""
    turns = 1 + int(rng.integers(max_turns))
    cats = [QUESTION_CATEGORIES[c] for c in rng.choice(len(QUESTION_CATEGORIES), size=turns, replace=False)]
    conversation = []
    for k, (_, q, a) in enumerate(questions(scene, cats, rng)):
        conversation += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return conversation


def text_only_turn(rng: np.random.Generator) -> tuple[str, str]:
    """An image-free exchange about the world's words."""
    if rng.random() < 0.5:
        thing, answer = _pick(rng, list(COLOURS)), TEXT_ONLY_ANSWERS[0]
    else:
        thing, answer = _with_article(_pick(rng, SHAPES)), TEXT_ONLY_ANSWERS[1]
    return _pick(rng, TEXT_ONLY_TEMPLATES).format(thing=thing), answer


def vocabulary() -> list[str]:
    """Every word (and punctuation mark) any caption, question or answer template can produce, sorted."""
    pieces = [*OBJECT_TEMPLATES, *CAPTION_TEMPLATES[1], *CAPTION_TEMPLATES[2], *(t for ts in QUESTION_TEMPLATES.values() for t in ts),
              *TEXT_ONLY_TEMPLATES, *COUNT_QUESTIONS, COLOUR_COUNT_QUESTION, YES_NO_QUESTION, *TEXT_ONLY_ANSWERS,
              "a an the object yes no", *COUNT_WORDS, *SHAPES, *COLOURS, *SIZES, *POSITIONS]
    pieces += [f for words in (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS, POSITION_PHRASES) for fs in words.values() for f in fs]
    words = set()
    for piece in pieces:
        words.update(re.findall(r"[a-z]+|[.,:?]", re.sub(r"\{\w+\}", " ", piece)))
    return sorted(words)


# ------------------------------------------------------------------------------------------------ splits


@dataclass(frozen=True)
class WorldSizes:
    paired: int = 8000           # image-caption pairs: train the toy CLIP (and the paired-pretraining upper bound)
    unpaired_images: int = 4000  # images without captions
    unpaired_texts: int = 8000   # captions of other scenes (pretraining text)
    instruct: int = 2000         # QA conversations on unpaired images (at most one per image)
    text_only: int = 50          # image-free instruction samples
    eval: int = 500              # held-out images, each with a reference caption and questions
    eval_questions_per_image: int = 2
    max_turns: int = 3           # QA turns per instruction conversation (1..max_turns)


PRESETS = {"default": WorldSizes(), "mini": WorldSizes(32, 24, 32, 16, 4, 12, 2, 3),
           # the demo on real parts: a 135M LLM and a 6-layer text tower cost far more CPU per sample than the toys
           "real": WorldSizes(2000, 1000, 1000, 300, 20, 60, 2, 3)}
SPLITS = ("paired", "unpaired_images", "unpaired_texts", "instruct", "eval")
ID_PREFIX = {"paired": "paired", "unpaired_images": "image", "unpaired_texts": "caption", "eval": "eval"}
IMAGE_DIR = {"paired": "paired", "unpaired_images": "unpaired", "eval": "eval"}


@dataclass
class Item:
    id: str
    split: str
    scene: Scene
    caption: str | None = None
    image: str | None = None  # path relative to the world folder


@dataclass
class World:
    seed: int
    sizes: WorldSizes
    paired: list[Item] = field(default_factory=list)
    unpaired_images: list[Item] = field(default_factory=list)
    unpaired_texts: list[Item] = field(default_factory=list)
    instruct: list[dict] = field(default_factory=list)
    eval: list[Item] = field(default_factory=list)
    eval_questions: list[dict] = field(default_factory=list)

    def image_items(self) -> list[Item]:
        return self.paired + self.unpaired_images + self.eval


def _rng(seed: int, split: str, stream: int, *more: int) -> np.random.Generator:
    """An independent random stream per (seed, split, purpose[, item])."""
    return np.random.default_rng([seed, SPLITS.index(split), stream, *more])


def _items(seed: int, split: str, count: int, captioned: bool, with_image: bool) -> list[Item]:
    scenes, words = _rng(seed, split, 0), _rng(seed, split, 1)
    items = []
    for i in range(count):
        item_id = f"{ID_PREFIX[split]}-{i:06d}"
        scene = sample_scene(scenes)
        items.append(Item(item_id, split, scene, caption(scene, words) if captioned else None,
                          f"images/{IMAGE_DIR[split]}/{item_id}.png" if with_image else None))
    return items


def make_world(seed: int = 0, sizes: WorldSizes | None = None) -> World:
    """Every scene, caption and question of the world (no images rendered): a pure function of (seed, sizes)."""
    sizes = sizes or PRESETS["default"]
    bad = {k: v for k, v in asdict(sizes).items() if not isinstance(v, int) or v < (1 if k == "max_turns" else 0)}
    if bad:
        raise ValueError(f"world sizes must be non-negative integers (max_turns at least 1), got {bad}")
    if sizes.instruct > sizes.unpaired_images:
        raise ValueError(f"instruct ({sizes.instruct}) must not exceed unpaired_images ({sizes.unpaired_images}): "
                         "each conversation is about a different unpaired image")
    world = World(seed, sizes)
    world.paired = _items(seed, "paired", sizes.paired, captioned=True, with_image=True)
    world.unpaired_images = _items(seed, "unpaired_images", sizes.unpaired_images, captioned=False, with_image=True)
    world.unpaired_texts = _items(seed, "unpaired_texts", sizes.unpaired_texts, captioned=True, with_image=False)
    world.eval = _items(seed, "eval", sizes.eval, captioned=True, with_image=True)

    rng = _rng(seed, "instruct", 3)
    for item in world.unpaired_images[: sizes.instruct]:
        world.instruct.append({"id": item.id, "image": item.image, "conversations": qa_conversation(item.scene, rng, sizes.max_turns)})
    for i in range(sizes.text_only):
        q, a = text_only_turn(rng)
        world.instruct.append({"id": f"chat-{i:06d}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})

    rng = _rng(seed, "eval", 3)
    per = sizes.eval_questions_per_image
    for i, item in enumerate(world.eval):
        cats = [QUESTION_CATEGORIES[(i * per + j) % len(QUESTION_CATEGORIES)] for j in range(per)]
        for j, (cat, q, a) in enumerate(questions(item.scene, cats, rng)):
            world.eval_questions.append({"question_id": f"{item.id}-q{j}", "image": item.image, "image_id": item.id,
                                         "text": q, "answer": a, "category": cat})
    return world


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def _pretrain_sample(item: Item) -> dict:
    return {"id": item.id, "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": item.caption}]}


def _manifest(world: World) -> dict:
    return {"version": WORLD_VERSION, "seed": world.seed, "sizes": asdict(world.sizes)}


def _render_to_file(job: tuple[Scene, int, str, int, str]) -> None:
    scene, seed, split, index, path = job
    render(scene, _rng(seed, split, 2, index)).save(path, format="PNG", compress_level=1)


def build_world(out_dir: str | Path, seed: int = 0, sizes: WorldSizes | str = "default", force: bool = False,
                workers: int = 0) -> World:
    """Generate the world, render its images (in `workers` processes; 0 = one per CPU) and write every file
    (module docstring). A folder that already holds a complete world of the same seed and sizes is left as
    it is unless `force`."""
    if isinstance(sizes, str):
        if sizes not in PRESETS:
            raise ValueError(f"unknown world preset {sizes!r}; choose from {sorted(PRESETS)}")
        sizes = PRESETS[sizes]
    out = Path(out_dir)
    world = make_world(seed, sizes)
    manifest_path = out / "world.json"
    if not force and manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if {k: existing.get(k) for k in ("version", "seed", "sizes")} == _manifest(world):
            return world
    manifest_path.unlink(missing_ok=True)
    for folder in IMAGE_DIR.values():
        (out / "images" / folder).mkdir(parents=True, exist_ok=True)
    jobs = [(item.scene, seed, item.split, int(item.id.rsplit("-", 1)[1]), str(out / item.image)) for item in world.image_items()]
    workers = workers or min(os.cpu_count() or 1, len(jobs) // 256 + 1)  # auto: no pool for a handful of images
    if workers > 1:  # each image has its own random stream, so the bytes do not depend on the worker count
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_render_to_file, jobs, chunksize=min(256, len(jobs) // workers + 1))
    else:
        for job in jobs:
            _render_to_file(job)

    _write_jsonl(out / "paired.jsonl", [{"id": it.id, "image": it.image, "caption": it.caption} for it in world.paired])
    _write_jsonl(out / "unpaired_images.jsonl", [{"id": it.id, "image": it.image} for it in world.unpaired_images])
    _write_jsonl(out / "unpaired_texts.jsonl", [{"id": it.id, "text": it.caption} for it in world.unpaired_texts])
    _write_jsonl(out / "eval_images.jsonl", [{"id": it.id, "image": it.image} for it in world.eval])
    _write_jsonl(out / "eval_captions.jsonl", [{"id": it.id, "image": it.image, "caption": it.caption,
                                                "attributes": it.scene.attributes()} for it in world.eval])
    _write_jsonl(out / "eval_questions.jsonl", world.eval_questions)
    _write_jsonl(out / "scenes.jsonl", [{"id": it.id, "split": it.split, "attributes": it.scene.attributes()}
                                        for it in world.paired + world.unpaired_images + world.unpaired_texts + world.eval])
    (out / "pretrain.json").write_text(json.dumps([_pretrain_sample(it) for it in world.unpaired_texts]))
    (out / "pretrain_paired.json").write_text(json.dumps([_pretrain_sample(it) for it in world.paired]))
    (out / "instruct.json").write_text(json.dumps(world.instruct))
    (out / "vocab.txt").write_text("\n".join(vocabulary()) + "\n")
    counts = {"paired": len(world.paired), "unpaired_images": len(world.unpaired_images),
              "unpaired_texts": len(world.unpaired_texts), "instruct": len(world.instruct),
              "eval": len(world.eval), "eval_questions": len(world.eval_questions)}
    manifest_path.write_text(json.dumps({**_manifest(world), "counts": counts}, indent=1) + "\n")
    return world


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR holds this world already")
    parser.add_argument("--workers", type=int, default=0, help="rendering processes (0: one per CPU)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    world = build_world(args.out_dir, args.seed, args.preset, args.force, args.workers)
    print(f"world (seed {args.seed}, {args.preset}): {len(world.image_items())} images, {len(world.unpaired_texts)} unpaired "
          f"captions, {len(world.instruct)} instruction samples, {len(world.eval_questions)} eval questions "
          f"in {args.out_dir} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()

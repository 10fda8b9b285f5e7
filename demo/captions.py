"""The toy world's text: template captions naming every attribute of every object (so the caption alone
determines the scene), their parser, QA about a scene, and the vocabulary any template can produce."""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from demo.scenes import COLOURS, POSITIONS, QUESTION_CATEGORIES, SHAPES, SIZES, Obj, Scene

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


# What a conversation has already said: (index of the object in scene.objects, attribute). A later turn whose answer
# is in it could be answered by copying from the context, which teaches copying rather than reading the image.
Revealed = set[tuple[int, str]]


# The attribute sets a question may name its object by: phrases "the star", "the red star", ..., "the object on the left"
REFERENCE_KEYS = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"), ("colour",),
                  ("size", "colour"), ("position",))


def _unique_references(scene: Scene, target: Obj, asked: str) -> list[tuple[str, ...]]:
    """The REFERENCE_KEYS that name `target` alone in the scene without the asked attribute."""
    return [keys for keys in REFERENCE_KEYS if asked not in keys
            and sum(_matches(o, {k: getattr(target, k) for k in keys}) for o in scene.objects) == 1]


def _phrase(target: Obj, keys: tuple[str, ...], rng: np.random.Generator) -> str:
    words = [getattr(target, k) for k in ("size", "colour") if k in keys] + [target.shape if "shape" in keys else "object"]
    phrase = "the " + " ".join(words)
    return phrase + " " + _pick(rng, POSITION_PHRASES[target.position]) if "position" in keys else phrase


def _reference(scene: Scene, target: Obj, asked: str, rng: np.random.Generator,
               avoid: Sequence[str] | None = None) -> tuple[str, tuple[str, ...]] | None:
    """(a noun phrase naming `target` uniquely in the scene without using the asked attribute, the attributes it
    names), or None. With `avoid` (attributes a later turn asks): a phrase naming none of them where one exists, a
    lone object being "the object" if need be."""
    unique = _unique_references(scene, target, asked)
    if avoid is not None:
        free = [keys for keys in unique if not set(keys) & set(avoid)]
        unique = free or ([()] if len(scene.objects) == 1 else unique)
    if not unique:
        return None
    keys = unique[rng.integers(len(unique))]
    return _phrase(target, keys, rng), keys


def binding_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(category, question, answer) of every conditional colour or shape question the templates can ask about an
    object of a two-object scene: per object, per asked attribute, per reference that names the object alone (about
    11 a scene; none for one object). Binding is learned from every question of an image, and late: docs/results.md,
    "Binding is slow to learn"."""
    if len(scene.objects) != 2:
        return []
    return [(asked, _pick(rng, QUESTION_TEMPLATES[asked]).format(ref=_phrase(target, keys, rng)), getattr(target, asked))
            for target in scene.objects for asked in ("colour", "shape")
            for keys in _unique_references(scene, target, asked)]


def _yes_no(scene: Scene, rng: np.random.Generator, revealed: Revealed | None = None) -> tuple[str, str] | None:
    """'is there ...?' about a colour + shape or a shape + position; half the time about an object that is there.
    With `revealed`: None where what the conversation said already gives the answer."""
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
    if revealed is not None:
        known = [all((i, k) in revealed for k in keys) for i in range(len(scene.objects))]
        if all(known) or any(k and _matches(o, attrs) for k, o in zip(known, scene.objects)):
            return None
        if answer == "yes":
            revealed.update((i, k) for i, o in enumerate(scene.objects) if _matches(o, attrs) for k in keys)
    return YES_NO_QUESTION.format(thing=_with_article(phrase)), answer


def _count(scene: Scene, rng: np.random.Generator, revealed: Revealed | None = None) -> tuple[str, str]:
    """'how many shapes' or 'how many {colour} shapes'; with `revealed`, the latter only while some object's colour
    is unsaid (it marks the colour said where every object has it)."""
    if rng.random() < 0.5:
        return _pick(rng, COUNT_QUESTIONS), COUNT_WORDS[len(scene.objects)]
    colour = scene.objects[0].colour if rng.random() < 0.5 else _pick(rng, list(COLOURS))
    count = sum(o.colour == colour for o in scene.objects)
    if revealed is not None:
        if all((i, "colour") in revealed for i in range(len(scene.objects))):
            return _pick(rng, COUNT_QUESTIONS), COUNT_WORDS[len(scene.objects)]
        if count == len(scene.objects):
            revealed.update((i, "colour") for i in range(count))
    return COLOUR_COUNT_QUESTION.format(colour=colour), COUNT_WORDS[count]


def question(scene: Scene, category: str, rng: np.random.Generator, revealed: Revealed | None = None,
             avoid: Sequence[str] = ()) -> tuple[str, str] | None:
    """(question, canonical answer) of a category about the scene; None when the scene allows no unambiguous one.
    With `revealed` (what the conversation has said so far; updated with what this turn says): None too where the
    answer is already in it, and the object is named without the attributes in `avoid` where it can be."""
    if category == "count":
        return _count(scene, rng, revealed)
    if category == "yes/no":
        return _yes_no(scene, rng, revealed)
    if category not in QUESTION_TEMPLATES:
        raise ValueError(f"unknown question category {category!r}; choose from {QUESTION_CATEGORIES}")
    index = int(rng.integers(len(scene.objects)))
    target = scene.objects[index]
    if revealed is not None and (index, category) in revealed:
        return None
    ref = _reference(scene, target, category, rng, avoid if revealed is not None else None)
    if ref is None:
        return None
    phrase, keys = ref
    if revealed is not None:
        revealed.update((index, k) for k in (*keys, category))
    return _pick(rng, QUESTION_TEMPLATES[category]).format(ref=phrase), getattr(target, category)


def questions(scene: Scene, categories: Sequence[str], rng: np.random.Generator,
              revealed: Revealed | None = None) -> list[tuple[str, str, str]]:
    """(category, question, answer) for each category asked, in order; one the scene cannot support becomes
    the next category that it can (count and yes/no always can, without `revealed`). With `revealed`, one question
    a category at most, none whose answer an earlier one gave (it is updated as the questions are asked)."""
    out, used = [], set()
    for position, category in enumerate(categories):
        start = QUESTION_CATEGORIES.index(category)
        for step in range(len(QUESTION_CATEGORIES)):
            cat = QUESTION_CATEGORIES[(start + step) % len(QUESTION_CATEGORIES)]
            if revealed is not None and (cat in used or cat in categories[position + 1:]):
                continue
            if (qa := question(scene, cat, rng, revealed, categories[position + 1:])) is not None:
                out.append((cat, *qa))
                used.add(cat)
                break
    return out


def qa_conversation(scene: Scene, rng: np.random.Generator, max_turns: int) -> list[dict]:
    """LLaVA turns of 1..max_turns questions of distinct categories about the scene; the image opens the first. No
    turn's answer is in what the turns before it said (the question "what colour is the star?" after "is the blue
    star small or large?" is answered by copying: 53-55% of the one-object colour and shape turns were, before;
    docs/results.md "A code by object")."""
    turns = 1 + int(rng.integers(max_turns))
    cats = [QUESTION_CATEGORIES[c] for c in rng.choice(len(QUESTION_CATEGORIES), size=turns, replace=False)]
    conversation = []
    for k, (_, q, a) in enumerate(questions(scene, cats, rng, revealed=set())):
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


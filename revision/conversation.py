"""Conversation templates: turn a LLaVA-style conversation into text segments, each marked trained or not.

- `plain` (pretraining): the image, then the caption. Nothing else; the caption is the only target.
- `chat` (instruction tuning): the tokenizer's own chat template when it has one, else `vicuna`.
  Assistant turns are the targets; everything the template adds around them is context.
- `vicuna`: a built-in "USER: ... ASSISTANT: ..." template for tokenizers without a chat template.

`system_prompt` (chat, vicuna): the system message of a conversation that has none; None leaves the template's own
default (SmolLM2's chat template adds a 21-token one to every sample, a fifth of a short QA conversation; "" keeps
only its empty frame). Training and inference pass the checkpoint's, so both render the same text.

The `<image>` placeholder stays in the text; the data module turns it into the visual block. `place_image` puts it
where a checkpoint was trained to see it (before or after its first question: `image_placement`), and `split_turns`
makes one sample of each question of a conversation; training and inference share them, so both ask alike.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from revision.model import IMAGE_TOKEN

TEMPLATES = ("plain", "chat", "vicuna")
# where the image goes in a sample's first user turn: before its text (LLaVA's "<image>\n{question}") or after it
# ("{question}\n<image>": the visual positions then attend to the question, an instruction-aware read)
IMAGE_PLACEMENTS = ("first", "last")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VICUNA_SYSTEM = "A chat between a user and an assistant that sees the picture."
logger = logging.getLogger(__name__)


@dataclass
class Segment:
    text: str
    train: bool  # whether its tokens are targets of the loss


def normalise_turns(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ({"from", "value"}) or chat messages ({"role", "content"}) as chat messages."""
    turns = []
    for i, turn in enumerate(conversations):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role not in ROLE_NAMES or not isinstance(content, str):
            raise ValueError(f"turn {i} is not a {{'from': human|gpt|system, 'value': str}} dict: {turn!r:.120}")
        turns.append({"role": ROLE_NAMES[role], "content": content})
    return turns


def with_system(turns: list[dict], system_prompt: str | None) -> list[dict]:
    """The turns with `system_prompt` as their system message when they have none (None: as they are)."""
    if system_prompt is None or (turns and turns[0]["role"] == "system"):
        return turns
    return [{"role": "system", "content": system_prompt}, *turns]


def count_images(turns: list[dict]) -> int:
    return sum(t["content"].count(IMAGE_TOKEN) for t in turns)


def without_image(turns: list[dict]) -> list[dict]:
    """The turns with the image placeholder (and the line break that set it apart) taken out."""
    def strip(text: str) -> str:
        return re.sub(rf"\s*{re.escape(IMAGE_TOKEN)}\s*", " ", text).strip() if IMAGE_TOKEN in text else text

    return [{**t, "content": strip(t["content"])} for t in turns]


def insert_image(turns: list[dict], placement: str) -> list[dict]:
    """The turns with the image placeholder added to the first user turn, before or after its text (`placement`)."""
    if placement not in IMAGE_PLACEMENTS:
        raise ValueError(f"unknown image placement {placement!r}; choose from {', '.join(IMAGE_PLACEMENTS)}")
    first = next(i for i, t in enumerate(turns) if t["role"] == "user")
    text = turns[first]["content"]
    content = f"{IMAGE_TOKEN}\n{text}" if placement == "first" else f"{text}\n{IMAGE_TOKEN}"
    return [*turns[:first], {**turns[first], "content": content}, *turns[first + 1:]]


def place_image(turns: list[dict], placement: str) -> list[dict]:
    """The turns with their image placeholder, wherever it was, moved to `placement` in the first user turn; turns
    without one as they are."""
    return insert_image(without_image(turns), placement) if count_images(turns) else turns


def image_placement_of(turns: list[dict]) -> str:
    """Where the image sits in its turn: "last" when text comes before it, else "first"."""
    turn = next((t["content"] for t in turns if IMAGE_TOKEN in t["content"]), IMAGE_TOKEN)
    return "last" if turn.split(IMAGE_TOKEN)[0].strip() else "first"


def split_turns(turns: list[dict]) -> list[list[dict]]:
    """One sample per exchange of a conversation (its user turns and the assistant's answer), each with the system
    message and the image, placed as the conversation had it; a one-exchange sample stays itself. (The embedded
    world's stage 2: 3.2x the steps for 1.2x the time, and answers no better on 2000 held-out questions a seed;
    docs/results.md "Three hundred questions are too few".)"""
    system = [t for t in turns if t["role"] == "system"]
    pieces: list[list[dict]] = [[]]
    for turn in (t for t in turns if t["role"] != "system"):
        if turn["role"] == "user" and pieces[-1] and pieces[-1][-1]["role"] == "assistant":
            pieces.append([])
        pieces[-1].append(turn)
    pieces = [piece for piece in pieces if any(t["role"] == "assistant" for t in piece)]  # a trailing question: no answer
    if len(pieces) <= 1:
        return [turns]
    if not count_images(turns):
        return [system + piece for piece in pieces]
    placement = image_placement_of(turns)
    return [insert_image(system + without_image(piece), placement) for piece in pieces]


def resolve_template(template: str, tokenizer) -> str:
    """The template actually used: `chat` becomes `vicuna` when the tokenizer has no chat template."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template (--version) {template!r}; choose from {', '.join(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        logger.warning("tokenizer has no chat template; using the built-in 'vicuna' template")
        return "vicuna"
    return template


def render(conversations: list[dict], template: str, tokenizer, system_prompt: str | None = None) -> list[Segment]:
    """Segments of one training sample; concatenated they are the full text."""
    turns = normalise_turns(conversations)
    if count_images(turns) > 1:
        raise ValueError(f"{count_images(turns)} {IMAGE_TOKEN} placeholders; a sample carries one image embedding")
    template = resolve_template(template, tokenizer)
    if template == "plain":
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
        if len(answers) != 1:
            raise ValueError(f"the plain template takes one caption (one gpt turn), got {len(answers)}")
        return [Segment((tokenizer.bos_token or "") + IMAGE_TOKEN, False),
                Segment(answers[0].strip() + (tokenizer.eos_token or ""), True)]
    turns = with_system(turns, system_prompt)
    if template == "vicuna":
        return _render_vicuna(turns, tokenizer)
    return _render_chat(turns, tokenizer)


def _render_vicuna(turns: list[dict], tokenizer) -> list[Segment]:
    system = next((t["content"] for t in turns if t["role"] == "system"), VICUNA_SYSTEM)
    segments = [Segment((tokenizer.bos_token or "") + system, False)]
    for turn in turns:
        if turn["role"] == "user":
            segments.append(Segment(f" USER: {turn['content']} ASSISTANT:", False))
        elif turn["role"] == "assistant":
            segments.append(Segment(f" {turn['content']}{tokenizer.eos_token or ''}", True))
    return segments


def _render_chat(turns: list[dict], tokenizer) -> list[Segment]:
    """Render with the tokenizer's template; an assistant turn's text is what it adds after the generation prompt."""
    def apply(messages: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    segments, done = [], ""
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant" or i == 0:
            continue
        prompt, full = apply(turns[:i], True), apply(turns[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix; "
                             "use --version vicuna")
        segments += [Segment(prompt[len(done):], False), Segment(full[len(prompt):], True)]
        done = full
    if turns and turns[-1]["role"] != "assistant":
        rest = apply(turns, False)
        segments.append(Segment(rest[len(done):], False))
    return segments


def render_prompt(conversations: list[dict], template: str, tokenizer, system_prompt: str | None = None) -> str:
    """The prompt text for generation: the conversation so far plus the cue for the assistant's answer."""
    turns = normalise_turns(conversations)
    template = resolve_template(template, tokenizer)
    if template == "plain":
        return (tokenizer.bos_token or "") + IMAGE_TOKEN
    turns = with_system(turns, system_prompt)
    if template == "vicuna":
        return "".join(s.text for s in _render_vicuna(turns, tokenizer))
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

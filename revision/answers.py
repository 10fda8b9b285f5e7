"""Reading model answers as the benchmarks do: option letters, yes/no, VQA-normalised short answers and caption
attribute words. The rules, and how revision.evaluate scores with them, are in revision/evaluate.py's docstring."""
from __future__ import annotations

import re
from collections.abc import Sequence


def plain_words(text: str) -> str:
    """Lowercase words joined by single spaces (punctuation dropped): the form option texts are compared in."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


_WRAP = r"[\s\"'*(\[]*"  # what may surround a bare letter: quotes, markdown bold, brackets
_WHOLE_LETTER = re.compile(_WRAP + r"([A-Za-z])[\s\"'*)\].:]*$")
_LEADING_LETTER = re.compile(_WRAP + r"([A-Za-z])\s*[).:\]](?=\s|$)")
_PHRASE_LETTER = re.compile(
    r"\b(?:answer|option|choice)\b(?:\s+(?:is|would be|should be|will be))?"  # "the answer is", "Option"
    r"\s*[:\-]?\s*([(\[]?)\s*([A-Za-z])(?=[^\w']|$)",  # then ":", "(" and one letter
    re.IGNORECASE,
)


def extract_option(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter an answer names (rules in revision/evaluate.py's docstring), or None when it names none."""
    options = {str(k).upper(): str(v) for k, v in (options or {}).items()}
    valid = set(options) or set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    text = text.strip()
    for pattern in (_WHOLE_LETTER, _LEADING_LETTER):
        m = pattern.match(text)
        if m and m.group(1).upper() in valid:
            return m.group(1).upper()
    phrased = set()
    for m in _PHRASE_LETTER.finditer(text):
        wrapped, letter, after = m.group(1), m.group(2), text[m.end():m.end() + 1]
        if letter.isupper() or wrapped or after in ("", ".", ",", ":", ";", ")", "]", "!", "?"):
            phrased.add(letter.upper())
    if len(phrased & valid) == 1:
        return (phrased & valid).pop()
    answer = plain_words(text)
    texts = {k: plain_words(v) for k, v in options.items() if plain_words(v)}
    exact = [k for k, v in texts.items() if v == answer]
    if len(exact) == 1:
        return exact[0]
    inside = [k for k, v in texts.items() if f" {v} " in f" {answer} "]
    inside = [k for k in inside if not any(j != k and f" {texts[k]} " in f" {texts[j]} " for j in inside)]
    if len(inside) == 1:
        return inside[0]
    long_answer = len(text.split()) > 3
    standalone = {c for c in re.findall(r"(?<![\w'])([A-Z])(?![\w'])", text) if not (long_answer and c in "AI")}
    if len(standalone & valid) == 1:
        return (standalone & valid).pop()
    return None


def parse_yes_no(text: str) -> str | None:
    """"yes" or "no" when the answer's first word is one of them, else None (unknown)."""
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words and words[0] in ("yes", "no") else None


_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))
# Contractions that answers often write without the apostrophe. Those whose bare form is also a word
# ("its", "well", "were", "ill", "lets", "id", "hell", "shell", "wed") are left alone.
_CONTRACTIONS = {c.replace("'", ""): c for c in (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hasn't haven't he'd he's "
    "how'd how's i'm i've isn't it'd it'll ma'am mightn't might've mustn't must've needn't o'clock shan't "
    "she'd she's should've shouldn't that's there's they'd they'll they're they've wasn't we've weren't "
    "what's where'd where's who'd who'll who's won't would've wouldn't y'all you'd you'll you're you've"
).split()}


def normalize_answer(text: str) -> str:
    """A short answer in the VQA evaluation's normal form (rules in revision/evaluate.py's docstring)."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", "", text)  # a period survives only between two digits
    text = re.sub(r"[^\w\s':.]|_", " ", text)
    words = (_NUMBER_WORDS.get(w, w) for w in text.split())
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy: min(#humans who gave `answer` / 3, 1), averaged over the leave-one-out subsets."""
    if len(human_answers) == 1:
        return float(normalize_answer(answer) == normalize_answer(human_answers[0]))
    hits = [normalize_answer(h) == normalize_answer(answer) for h in human_answers]
    total = sum(hits)
    return sum(min((total - hit) / 3, 1.0) for hit in hits) / len(hits)


def attribute_hits(caption: str, attributes: dict[str, str]) -> dict[str, bool]:
    """For each attribute, whether its value (one or more words) appears as whole words in the caption."""
    said = f" {plain_words(caption)} "
    return {attr: f" {plain_words(value)} " in said for attr, value in attributes.items()}


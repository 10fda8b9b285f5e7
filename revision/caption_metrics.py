"""COCO caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) from pycocoevalcap (`pip install 'revision[eval]'`), with
the PTB tokenizer (a java subprocess) when java is on PATH, else lowercase words."""
from __future__ import annotations

import logging
import shutil
import subprocess
from typing import Any

from revision.answers import plain_words

logger = logging.getLogger(__name__)


def coco_caption_scores(
    captions: dict[str, str], references: dict[str, list[str]], tokenizer: str = "auto"
) -> dict[str, Any]:
    """BLEU-1..4, ROUGE-L, CIDEr-D from pycocoevalcap. tokenizer: "ptb" (needs java), "simple", or "auto"."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if tokenizer == "auto":
        tokenizer = "ptb" if shutil.which("java") else "simple"
    if tokenizer == "ptb":
        try:
            res, gts = _ptb_tokenize(captions), _ptb_tokenize(references)
        except (OSError, subprocess.CalledProcessError) as e:  # e.g. a read-only site-packages for its temp file
            logger.warning("PTB tokenizer failed (%s); using lowercase words", e)
            tokenizer = "simple"
    if tokenizer == "simple":
        res = {q: [plain_words(c)] for q, c in captions.items()}
        gts = {q: [plain_words(r) for r in refs] for q, refs in references.items()}
    elif tokenizer != "ptb":
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}; expected auto, ptb or simple")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
    return {**scores, "ROUGE-L": float(rouge), "CIDEr": float(cider), "n": len(captions), "tokenizer": tokenizer}


def _ptb_tokenize(texts: dict[str, str | list[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    as_lists = {q: [t] if isinstance(t, str) else t for q, t in texts.items()}
    return PTBTokenizer().tokenize({q: [{"caption": t} for t in ts] for q, ts in as_lists.items()})

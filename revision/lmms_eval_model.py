"""lmms-eval adapter: `python -m lmms_eval --model revision --model_args pretrained=CKPT --tasks ...`.

Needs the optional extra `lmms` (lmms-eval, which is not imported by anything else in revision). The
package registers itself through the entry point group "lmms_eval.models" (`manifest` below), so
lmms-eval finds `--model revision` without edits to lmms-eval. model_args: pretrained (the checkpoint
folder), device, dtype, encoder, base_model, batch_size, no_verify (skip the checkpoint's sha256 check).

Requests come as lmms-eval's "simple model" arguments:
  generate_until: (context, gen_kwargs, doc_to_visual, doc_id, task, split)
  loglikelihood:  (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)
                  -> (loss: mean negative log-prob per continuation token, is_greedy), lmms-eval's convention
where doc = task_dict[task][split][doc_id] and doc_to_visual(doc) is a list of PIL images (or paths).
ReVision reads one global embedding per sample: the first visual is used, further ones are dropped
(with a warning). The plain functions below do the work and need no lmms-eval; the class only adapts.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from revision.infer import Predictor, Visual

try:
    from lmms_eval.api.model import lmms as _LMMSBase
except ImportError:  # without the `lmms` extra the core functions still work (and are tested)
    _LMMSBase = object

logger = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 8  # for batch_size "auto": the model is small next to its visual block


def manifest():
    """Entry point target: tells lmms-eval's model registry where the `revision` model class lives."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="revision", simple_class_path="revision.lmms_eval_model.ReVision")


def generation_options(gen_kwargs: dict | None) -> dict:
    """lmms-eval gen_kwargs -> Predictor.answer_batch options (greedy unless a temperature > 0 is asked for)."""
    gen_kwargs = dict(gen_kwargs or {})
    until = gen_kwargs.get("until") or []
    return {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or 128),
        "temperature": float(gen_kwargs.get("temperature") or 0.0) if gen_kwargs.get("do_sample", True) else 0.0,
        "top_p": float(gen_kwargs.get("top_p") or 1.0),
        "num_beams": int(gen_kwargs.get("num_beams") or 1),
        "stop": [until] if isinstance(until, str) else list(until),
    }


def first_visual(visuals: Any, where: str = "") -> Visual:
    """The one visual a sample carries: the first of doc_to_visual's list (None when it has none)."""
    if visuals is None:
        return None
    if not isinstance(visuals, (list, tuple)):
        return visuals
    flat = [v for item in visuals for v in (item if isinstance(item, (list, tuple)) else [item]) if v is not None]
    if len(flat) > 1:
        logger.warning("%s: %d visuals; ReVision reads one embedding per sample and uses the first", where, len(flat))
    return flat[0] if flat else None


def _doc_visual(doc_to_visual: Callable | None, task_dict: dict, task: str, split: str, doc_id: int) -> tuple[Any, Visual]:
    doc = task_dict[task][split][doc_id]
    return doc, first_visual(doc_to_visual(doc) if doc_to_visual else None, f"{task}/{split}/{doc_id}")


def generate_from_requests(predictor: Predictor, requests: Sequence[tuple], task_dict: dict,
                           batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
    """Answers to generate_until request args, in order; consecutive requests with the same options share a batch."""
    answers: list[str] = []
    start = 0
    while start < len(requests):
        options = generation_options(requests[start][1])
        end = start + 1
        while end < len(requests) and end - start < batch_size and generation_options(requests[end][1]) == options:
            end += 1
        contexts, visuals = [], []
        for context, _, doc_to_visual, doc_id, task, split in requests[start:end]:
            contexts.append(context)
            visuals.append(_doc_visual(doc_to_visual, task_dict, task, split, doc_id)[1])
        answers += predictor.answer_batch(contexts, visuals, batch_size=batch_size, **options)
        start = end
    return answers


def loglikelihood_from_requests(predictor: Predictor, requests: Sequence[tuple], task_dict: dict) -> list[tuple[float, bool]]:
    """(loss, is greedy) for loglikelihood request args, in order. The loss is the mean negative log-prob per
    continuation token, as lmms-eval's own models (LLaVA and others) return it: lmms-eval 0.7.3 scores
    multiple choice by argmin over these numbers, so a log-prob here would pick the worst option."""
    results = []
    for context, continuation, doc_to_visual, doc_id, task, split in requests:
        doc, visual = _doc_visual(doc_to_visual, task_dict, task, split, doc_id)
        if callable(continuation):  # some tasks pass doc_to_target instead of the string
            continuation = continuation(doc)
        logprobs, greedy = predictor.token_logprobs(context, str(continuation), visual)
        results.append((-float(logprobs.mean()) if len(logprobs) else 0.0, greedy))
    return results


class ReVision(_LMMSBase):
    """lmms-eval model `revision` (a "simple" model: text contexts, PIL visuals)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str = "auto", dtype: str = "auto", batch_size: int | str = 1,
                 max_batch_size: int | str | None = None, encoder: str | None = None, base_model: str | None = None,
                 trust_remote_code: bool = False, no_verify: bool | str = False):
        if _LMMSBase is object:
            raise ImportError("the lmms-eval adapter needs lmms-eval: pip install 'revision[lmms]'")
        super().__init__()
        # the checkpoint's files are checked against its manifest (sha256) unless no_verify=True
        self.predictor = Predictor(pretrained, device, dtype, encoder=encoder, base_model=base_model,
                                   trust_remote_code=trust_remote_code, verify=str(no_verify).lower() not in ("true", "1"))
        batch = str(batch_size)
        self.batch_size = int(batch) if batch.isdigit() else int(max_batch_size or DEFAULT_BATCH_SIZE)

    def generate_until(self, requests) -> list[str]:
        return generate_from_requests(self.predictor, [r.args for r in requests], self.task_dict, self.batch_size)

    def loglikelihood(self, requests) -> list:
        from lmms_eval.api.instance import GenerationResult

        results = loglikelihood_from_requests(self.predictor, [r.args for r in requests], self.task_dict)
        # lmms-eval 0.7.3 passes every output through unwrap_generation_output, which turns a bare
        # (float, bool) into its str(); wrapped as GenerationResult.text it arrives as the tuple.
        return [GenerationResult(text=result) for result in results]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("ReVision answers single-round requests (generate_until, loglikelihood)")

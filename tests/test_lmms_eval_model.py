"""The lmms-eval adapter: request arguments → predictor calls, lmms-eval's own objects, and `python -m lmms_eval`
end to end on local tasks this file writes (lmms-eval is in the dev extra)."""
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from revision.infer import Predictor
from revision.lmms_eval_model import first_visual, generate_from_requests, generation_options, loglikelihood_from_requests
from test_infer import COLOURS, QUESTION, build_checkpoint  # the same tiny trained checkpoint (tests/ is on sys.path)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    world = build_checkpoint(tmp_path_factory.mktemp("lmms"))
    # A task as lmms-eval hands it over: docs by task and split; doc_to_visual gives a list of PIL images.
    docs = [{"colour": name, "image": Image.open(path).convert("RGB")} for name, path in world["images"].items()]
    world["task_dict"] = {"colours": {"test": docs}}
    return world


@pytest.fixture(scope="module")
def predictor(world):
    return Predictor(world["ckpt"], device="cpu")


def doc_to_visual(doc):
    return [doc["image"]]


def test_generation_options_from_gen_kwargs():
    assert generation_options({"until": "\n", "max_new_tokens": 16, "temperature": 0, "do_sample": False}) == {
        "max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "num_beams": 1, "stop": ["\n"]}
    sampled = generation_options({"until": ["</s>", "Q:"], "temperature": 0.7, "top_p": None})
    assert (sampled["temperature"], sampled["top_p"], sampled["stop"]) == (0.7, 1.0, ["</s>", "Q:"])
    assert generation_options({"temperature": 0.7, "do_sample": False})["temperature"] == 0.0
    assert generation_options(None)["max_new_tokens"] == 128


def test_first_visual_takes_one_image(caplog):
    a, b = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4))
    assert first_visual([]) is None and first_visual(None) is None and first_visual([[a]]) is a
    with caplog.at_level(logging.WARNING):
        assert first_visual([a, b], "task/test/3") is a
    assert "task/test/3: 2 visuals" in caplog.text


def test_generate_until_requests(world, predictor):
    greedy = {"until": ["\n"], "max_new_tokens": 6, "do_sample": False}
    requests = [(QUESTION, greedy, doc_to_visual, i, "colours", "test") for i in range(4)]
    requests.insert(2, ("describe this", {**greedy, "max_new_tokens": 3}, doc_to_visual, 1, "colours", "test"))
    answers = generate_from_requests(predictor, requests, world["task_dict"], batch_size=3)
    assert answers[:2] + answers[3:] == list(COLOURS)
    assert answers[2] == predictor.answer("describe this", world["images"]["green"], max_new_tokens=3)
    text_only = generate_from_requests(predictor, [(QUESTION, greedy, None, 0, "colours", "test")], world["task_dict"])
    assert text_only == [predictor.answer(QUESTION, None, max_new_tokens=6)]


def test_loglikelihood_requests_give_losses_whose_argmin_is_the_right_option(world, predictor):
    # lmms-eval 0.7.3 picks a multiple-choice answer by argmin: the adapter returns the mean NLL per token.
    for doc_id, doc in enumerate(world["task_dict"]["colours"]["test"]):
        requests = [(QUESTION, f" {name}", doc_to_visual, doc_id, "colours", "test") for name in COLOURS]
        scores = loglikelihood_from_requests(predictor, requests, world["task_dict"])
        assert list(COLOURS)[min(range(4), key=lambda i: scores[i][0])] == doc["colour"]
        assert [greedy for _, greedy in scores] == [name == doc["colour"] for name in COLOURS]
        assert all(loss > 0 for loss, _ in scores)
    # a doc_to_target callable instead of the continuation string; a two-token continuation is averaged
    target = loglikelihood_from_requests(predictor, [(QUESTION, lambda d: d["colour"] + " star", doc_to_visual, 2,
                                                      "colours", "test")], world["task_dict"])
    logprobs, greedy = predictor.token_logprobs(QUESTION, "blue star", world["images"]["blue"])
    assert len(logprobs) == 2 and not greedy
    assert target == [(pytest.approx(-logprobs.mean()), False)]
    ll, _ = predictor.loglikelihood(QUESTION, "blue star", world["images"]["blue"])
    assert ll == pytest.approx(logprobs.sum())


def test_with_lmms_eval_instances(world):
    from lmms_eval.api.instance import Instance, unwrap_generation_output
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from revision.lmms_eval_model import ReVision, manifest

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("revision") is ReVision
    model = ReVision.create_from_arg_string(f"pretrained={world['ckpt']}",
                                            {"batch_size": "2", "max_batch_size": None, "device": "cpu"})
    assert model.batch_size == 2
    model.task_dict = world["task_dict"]

    def instance(kind, args, doc_id):
        return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "colours", "doc_id": doc_id, "repeats": 1})

    greedy = {"until": ["\n"], "max_new_tokens": 6, "do_sample": False}
    generated = model.generate_until([instance("generate_until", (QUESTION, greedy, doc_to_visual, i, "colours", "test"), i)
                                      for i in range(4)])
    assert [unwrap_generation_output(g)[0] for g in generated] == list(COLOURS)
    scored = model.loglikelihood([instance("loglikelihood", (QUESTION, name, doc_to_visual, 0, "colours", "test"), 0)
                                  for name in COLOURS])
    outputs = [unwrap_generation_output(s)[0] for s in scored]  # what the evaluator stores as each response
    assert all(isinstance(loss, float) and isinstance(greedy, bool) for loss, greedy in outputs)
    assert [greedy for _, greedy in outputs] == [True, False, False, False]
    assert min(range(4), key=lambda i: outputs[i][0]) == 0  # lmms-eval's argmin picks "red" for the red image
    with pytest.raises(NotImplementedError):
        model.generate_until_multi_round([])


TASK_UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_choice(doc):
    return COLOURS


def doc_to_target(doc):
    return COLOURS.index(doc["colour"])


def exact_colour(doc, results):
    return {"exact_colour": float(results[0].strip() == doc["colour"])}
"""


def write_tasks(root: Path, images: dict[str, Path]) -> None:
    """Two lmms-eval tasks over local JSONL docs and the test's own images: one generation task (exact colour),
    one multiple-choice task (lmms-eval's acc: the choice whose returned score is lowest)."""
    # two docs per colour, so a constant answer or a flipped choice rule cannot reach the full score
    docs = [{"question": QUESTION, "colour": name, "image": str(path)} for name, path in images.items()] * 2
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "revision_test_utils.py").write_text(f"COLOURS = {list(COLOURS)!r}\n" + TASK_UTILS)
    common = f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / 'docs.jsonl'}
        test_split: test
        doc_to_visual: !function revision_test_utils.doc_to_visual
        doc_to_text: question
        metadata:
          version: 0.0
        """
    (root / "colours_gen.yaml").write_text(textwrap.dedent(common) + textwrap.dedent("""
        task: revision_colours_gen
        output_type: generate_until
        doc_to_target: colour
        generation_kwargs:
          until: ["\\n"]
          max_new_tokens: 6
          do_sample: false
        process_results: !function revision_test_utils.exact_colour
        metric_list:
          - metric: exact_colour
            aggregation: mean
            higher_is_better: true
        """))
    (root / "colours_mc.yaml").write_text(textwrap.dedent(common) + textwrap.dedent("""
        task: revision_colours_mc
        output_type: multiple_choice
        doc_to_choice: !function revision_test_utils.doc_to_choice
        doc_to_target: !function revision_test_utils.doc_to_target
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))


def test_lmms_eval_cli_scores_local_tasks(world, tmp_path):
    """`python -m lmms_eval --model revision` end to end: the checkpoint names every image's colour, so both tasks
    score 1.0. lmms-eval picks a multiple-choice answer by the argmin of what the adapter returns; were the sign
    flipped (log-likelihoods instead of losses), acc would fall to 0."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks, world["images"])
    out = tmp_path / "results"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "revision", "--model_args", f"pretrained={world['ckpt']},device=cpu",
         "--tasks", "revision_colours_gen,revision_colours_mc", "--include_path", str(tasks), "--batch_size", "2",
         "--output_path", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {}
    for path in out.rglob("*_results.json"):
        results.update(json.loads(path.read_text())["results"])
    assert results["revision_colours_gen"]["exact_colour,none"] == 1.0
    assert results["revision_colours_mc"]["acc,none"] == 1.0

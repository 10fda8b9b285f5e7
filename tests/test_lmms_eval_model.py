"""The lmms-eval adapter: request arguments → predictor calls (always), and lmms-eval's own objects (if installed)."""
import logging

import pytest
from PIL import Image

from revision.infer import Predictor
from revision.lmms_eval_model import (first_visual, generate_from_requests, generation_options,
                                      loglikelihood_from_requests)
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
    pytest.importorskip("lmms_eval")
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

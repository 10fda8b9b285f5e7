"""demo.binding / demo.world.write_binding / demo.captions.binding_questions: stage-2 data for binding, every
conditional colour or shape question about the two-object scenes of more unpaired images of a run's world."""
import json
import shutil

import numpy as np
import pytest

from demo import binding
from demo.captions import binding_questions
from demo.scenes import Obj, Scene
from demo.world import write_binding
from revision.store import EmbeddingStore


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_question_names_one_object_and_asks_its_colour_or_shape():
    star = Obj("star", "red", "small", "top left")
    square = Obj("square", "blue", "small", "bottom right")
    asked = binding_questions(Scene((star, square), "plain"), np.random.default_rng(0))
    # per object and asked attribute: its colour named by shape, size+shape or position; its shape by colour,
    # size+colour or position (the world's references; size alone is none)
    assert len(asked) == 2 * (3 + 3)
    for category, question, answer in asked:
        target = star if answer in (star.colour, star.shape) else square
        assert answer == getattr(target, category)
        assert category != "colour" or target.colour not in question  # never names what it asks
        assert category != "shape" or target.shape not in question
    # the same colour on both objects: colour alone names neither, size with it does
    twins = binding_questions(Scene((star, Obj("square", "red", "large", "left")), "plain"), np.random.default_rng(0))
    assert not any("the red object" in q for _, q, _ in twins) and any("the small red object" in q for _, q, _ in twins)
    assert {a for c, _, a in twins if c == "colour"} == {"red"}
    assert binding_questions(Scene((star,), "plain"), np.random.default_rng(0)) == []


def test_write_binding_draws_the_unpaired_stream_on_and_asks_every_two_object_scene(mini_demo, tmp_path):
    world = mini_demo / "seed-0" / "world"
    own = [r for r in lines(world / "scenes.jsonl") if r["split"] == "unpaired_images"]
    n = write_binding(world, len(own) + 20, tmp_path / "b")
    images = lines(tmp_path / "b" / "unpaired_images.jsonl")
    assert len(images) == len(own) + 20 and (tmp_path / "b" / images[-1]["image"]).stat().st_size > 0
    scenes = {r["id"]: r["attributes"] for r in lines(tmp_path / "b" / "scenes.jsonl")}
    assert all(scenes[r["id"]] == r["attributes"] for r in own)  # the world's own images are the first
    samples = json.loads((tmp_path / "b" / "binding.json").read_text())
    assert len(samples) == n == json.loads((tmp_path / "b" / "world.json").read_text())["counts"]["binding_questions"] > 0
    for s in samples:
        objects = scenes[s["id"]]["objects"]
        question, answer = s["conversations"][0]["value"], s["conversations"][1]["value"]
        assert len(objects) == 2 and question.startswith("<image>\n")
        assert answer in {o["colour"] for o in objects} | {o["shape"] for o in objects}
    with pytest.raises(ValueError, match="unpaired images of its own"):
        write_binding(world, len(own) - 1, tmp_path / "fewer")
    edited = shutil.copytree(world, tmp_path / "edited", ignore=shutil.ignore_patterns("images"))
    (edited / "scenes.jsonl").write_text("".join(json.dumps({**r, "attributes": {**r["attributes"], "count": 9}}) + "\n"
                                                 for r in lines(world / "scenes.jsonl")))
    with pytest.raises(ValueError, match="is not what its seed and sizes draw"):
        write_binding(edited, len(own) + 1, tmp_path / "refused")


def test_the_cli_embeds_the_images_with_the_runs_encoder(mini_demo, tmp_path, capsys):
    run = mini_demo / "seed-0"
    total = len(lines(run / "world" / "unpaired_images.jsonl")) + 8
    binding.main(["--run", str(run), "--images", str(total)])
    folder = run / f"binding-{total}"
    assert list(EmbeddingStore(folder / "emb" / "image").load_all().ids) == [r["id"] for r in lines(folder / "unpaired_images.jsonl")]
    assert f"DATA={folder / 'binding.json'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        binding.main(["--run", str(tmp_path)])
    assert exit_info.value.code == 2 and "not a seed folder of demo.pipeline" in capsys.readouterr().err

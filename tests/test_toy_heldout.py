"""demo.heldout: more held-out questions of a finished run, drawn from the same eval streams, scored with SEs."""
import json
import math
import shutil

import pytest

from demo import heldout
from demo.world import write_more_eval
from revision.store import EmbeddingStore


@pytest.fixture(scope="module")
def demo(mini_demo):
    return mini_demo


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_more_held_out_questions_are_the_eval_streams_drawn_further(demo, tmp_path):
    world = demo / "seed-0" / "world"
    own = lines(world / "eval_questions.jsonl")
    assert write_more_eval(world, 3, tmp_path / "three") == 6 and write_more_eval(world, 5, tmp_path / "five") == 10
    three, five = lines(tmp_path / "three" / "eval_questions.jsonl"), lines(tmp_path / "five" / "eval_questions.jsonl")
    assert five[:6] == three  # the same streams: fewer images are a prefix of more
    assert not {q["image_id"] for q in five} & {q["image_id"] for q in own}  # none of the run's own images
    assert (tmp_path / "five" / three[0]["image"]).stat().st_size > 0
    assert json.loads((tmp_path / "five" / "world.json").read_text())["counts"] == {"eval": 5, "eval_questions": 10}
    # a world whose questions its seed no longer draws (edited, or another generator) is refused
    edited = shutil.copytree(world, tmp_path / "edited", ignore=shutil.ignore_patterns("images"))
    (edited / "eval_questions.jsonl").write_text("".join(json.dumps({**q, "answer": "red"}) + "\n" for q in own))
    with pytest.raises(ValueError, match="is not what its seed and sizes draw"):
        write_more_eval(edited, 3, tmp_path / "refused")


def test_every_checkpoint_answers_and_each_score_has_its_standard_error(demo, capsys):
    heldout.main(["--run", str(demo / "seed-0"), "--images", "6"])
    folder = demo / "seed-0" / "heldout-6"
    assert len(EmbeddingStore(folder / "emb" / "image").load_all().ids) == 6
    scores = json.loads((folder / "scores.json").read_text())
    assert set(scores) == {"realign", "no_stage1"}
    for name, s in scores.items():
        assert len(lines(folder / f"answers_{name}.jsonl")) == 12 == s["all"]["n"]
        assert sum(s[c]["n"] for c in heldout.CATEGORIES if c in s) == 12
        assert sum(v["n"] for k, v in s.items() if ", " in k) <= 12  # by objects: colour, shape, size, position
        for v in s.values():
            assert v["se"] == pytest.approx(math.sqrt(v["accuracy"] * (1 - v["accuracy"]) / v["n"]))
    table = capsys.readouterr().out
    assert "| realign | " in table and f"{scores['realign']['all']['accuracy']:.3f} ± " in table and "all (n 12)" in table


def test_bad_arguments_are_one_line_errors(demo, tmp_path, capsys):
    for argv, message in ((["--run", str(demo / "seed-0"), "--images", "0"], "--images 0: expected at least 1"),
                          (["--run", str(tmp_path)], "not a seed folder of demo.pipeline"),
                          (["--run", str(demo / "seed-0"), "--checkpoint", "realign"], "expected NAME=FOLDER")):
        with pytest.raises(SystemExit) as exit_info:
            heldout.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

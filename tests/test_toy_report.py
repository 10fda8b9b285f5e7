"""The pipeline's report on hand-made per-seed results: the mean ± std table and the per-seed differences."""
import json

import pytest

from demo.report import caption_scores, difference_table, table


def _summaries():
    # three seeds; realign beats none by +0.10, +0.00, +0.05 on QA; only none and realign have captions
    qa = {"none": (0.30, 0.40, 0.35), "realign": (0.40, 0.40, 0.40), "no_stage1": (0.20, 0.30, 0.25)}
    return [{"seed": seed, "rows": {row: {"qa_acc": values[i], **({"caption_acc": 0.1 * (i + 1) + (row == "realign") * 0.02}
                                                                    if row != "no_stage1" else {})}
                                    for row, values in qa.items()}} for i, seed in enumerate((0, 1, 2))]


def test_difference_table_pairs_rows_by_seed():
    text = difference_table(_summaries(), "none")
    assert "| seed 0 | seed 1 | seed 2 | mean ± std |" in text
    assert "| realign | QA acc. | +0.100 | +0.000 | +0.050 | +0.050 ± 0.050 |" in text
    assert "| no_stage1 | QA acc. | -0.100 | -0.100 | -0.100 | -0.100 ± 0.000 |" in text
    assert "| realign | caption attr. acc. (strict) | +0.020 | +0.020 | +0.020 | +0.020 ± 0.000 |" in text
    assert "| no_stage1 | caption" not in text  # no captions: no row, rather than a row of dashes
    assert "| none |" not in text


def test_table_gives_mean_and_sample_std_over_seeds():
    markdown, numbers = table(_summaries())
    assert numbers["rows"]["none"]["qa_acc"]["mean"] == pytest.approx(0.35)
    assert numbers["rows"]["none"]["qa_acc"]["std"] == pytest.approx(0.05)  # sample std (ddof 1)
    assert numbers["rows"]["none"]["qa_acc"]["values"] == [0.30, 0.40, 0.35]
    assert "| realign | — | — | — | — | 0.220 ± 0.100 | — | — | 0.400 ± 0.000 |" in markdown  # no held-out source caption


def test_caption_scores_match_objects_by_attributes(tmp_path):
    world = tmp_path / "w"
    world.mkdir()
    objects = [{"shape": "circle", "colour": "red", "size": "small", "position": "top left"},
               {"shape": "star", "colour": "blue", "size": "large", "position": "middle"}]
    (world / "eval_captions.jsonl").write_text(json.dumps({"id": "e0", "attributes": {"objects": objects}}) + "\n")
    answers = tmp_path / "a.jsonl"
    # Objects in the other order, one attribute wrong (green), synonyms (disk, big, centre) understood.
    answers.write_text(json.dumps({"question_id": "e0", "text": "a big blue star in the centre and a tiny green disk "
                                                                 "in the top left corner."}) + "\n")
    scores = caption_scores(answers, world)
    assert scores["attribute_acc"] == pytest.approx(7 / 8)
    assert scores["per_attribute"]["colour"] == 0.5 and scores["all_correct"] == 0.0 and scores["count_acc"] == 1.0
    assert scores["strict_attribute_acc"] == pytest.approx(7 / 8)  # as many objects named as there are
    # One object too many: the lenient score keeps its hits, the strict one counts none.
    answers.write_text(json.dumps({"question_id": "e0", "text": "a big blue star in the centre and a tiny red disk "
                                                                 "in the top left corner and a big red box."}) + "\n")
    scores = caption_scores(answers, world)
    assert scores["attribute_acc"] == 1.0 and scores["strict_attribute_acc"] == 0.0 and scores["count_acc"] == 0.0

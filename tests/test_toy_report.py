"""The pipeline's report on hand-made per-seed results: the mean ± std table and the per-seed differences."""
import json

import pytest

from demo import report
from demo.budget import BUDGETS
from demo.report import caption_scores, difference_table, merge_results, qa_binding, table
from revision.errors import InputError


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


def test_caption_scores_split_by_the_scenes_number_of_objects(tmp_path):
    """A text row can learn one-object captions and not two-object ones (a sentence embedding binds poorly): the
    split shows which scenes a row reads."""
    world = tmp_path / "w"
    world.mkdir()
    one = [{"shape": "square", "colour": "green", "size": "small", "position": "middle"}]
    two = [{"shape": "circle", "colour": "red", "size": "small", "position": "top left"},
           {"shape": "star", "colour": "blue", "size": "large", "position": "middle"}]
    (world / "eval_captions.jsonl").write_text("".join(json.dumps({"id": i, "attributes": {"objects": o}}) + "\n"
                                                       for i, o in (("e1", one), ("e2", two))))
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": text}) + "\n" for i, text in (
        ("e1", "a small green square in the middle."),
        ("e2", "a small blue circle at the top left and a large red star in the middle."))))  # colours swapped
    scores = caption_scores(answers, world)
    assert scores["strict_by_objects"] == {"one object": 1.0, "two objects": pytest.approx(6 / 8)}
    assert scores["strict_by_objects_attribute"] == {
        **{f"{k}, one object": 1.0 for k in ("colour", "shape", "size", "position")},
        "colour, two objects": 0.0, **{f"{k}, two objects": 1.0 for k in ("shape", "size", "position")}}
    assert scores["strict_attribute_acc"] == pytest.approx(10 / 12)


def test_qa_binding_tells_a_swap_from_an_unseen_value(tmp_path):
    """A wrong answer about one of two objects that names the other object's value is a binding swap; a value neither
    object has is not; objects alike in the attribute asked cannot swap and are left out of the share."""
    world = tmp_path / "w"
    world.mkdir()
    one = [{"shape": "square", "colour": "green", "size": "small", "position": "middle"}]
    two = [{"shape": "circle", "colour": "red", "size": "small", "position": "top left"},
           {"shape": "star", "colour": "blue", "size": "small", "position": "middle"}]
    (world / "scenes.jsonl").write_text("".join(json.dumps({"id": i, "split": split, "attributes": {"objects": o}}) + "\n"
                                                for i, split, o in (("e1", "eval", one), ("e2", "eval", two), ("e1", "paired", two))))
    asked = [("q1", "e1", "colour", "green", "Green."), ("q2", "e2", "colour", "red", "blue"),  # right; swapped
             ("q3", "e2", "colour", "blue", "blue"), ("q4", "e2", "shape", "star", "a triangle"),  # right; neither object's
             ("q5", "e2", "size", "small", "large"), ("q6", "e2", "count", "two", "2")]  # alike in size; no binding
    (world / "eval_questions.jsonl").write_text("".join(
        json.dumps({"question_id": q, "image_id": i, "category": c, "answer": a}) + "\n" for q, i, c, a, _ in asked))
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q, "text": t}) + "\n" for q, _, _, _, t in asked))
    scores = qa_binding(answers, world)
    assert scores["accuracy"] == {"colour, one object": 1.0, "colour, two objects": 0.5, "count, two objects": 1.0,
                                  "shape, two objects": 0.0, "size, two objects": 0.0}
    assert scores["swaps"] == {"colour": 0.5, "shape": 0.0}


def _run_file(path, rows, gap=0.7, **budget):
    """A results.json as demo.pipeline writes it, for `rows` of seeds 0 and 1 (QA only)."""
    from dataclasses import asdict, replace

    settings = asdict(replace(BUDGETS["default"], **budget))
    per_seed = [{"seed": seed, "budget": settings, "rows": {r: {"qa_acc": 0.5 + 0.1 * i + 0.01 * seed} for i, r in enumerate(rows)},
                 "stage_seconds": {"world": 10.0, "minilm_clip": 100.0, **{f"{r}.stage2": 50.0 for r in rows}},
                 "wall_seconds": 110.0 + 50 * len(rows),
                 "clip": {k: gap + seed for k in report.GAP_KEYS}, "probes": {"skipped": "test"}} for seed in (0, 1)]
    path.write_text(json.dumps({"command": f"python -m demo.pipeline --rows {','.join(rows)}", "per_seed": per_seed}))
    return path


def test_merge_puts_rows_run_apart_in_one_table(tmp_path, capsys):
    first = _run_file(tmp_path / "a.json", ["none", "realign"])
    second = _run_file(tmp_path / "b.json", ["c3"], threads=1, captions=True)  # which stages ran is not the recipe
    merged = merge_results([first, second])
    assert list(merged[1]["rows"]) == ["none", "realign", "c3"] and merged[1]["rows"]["c3"]["qa_acc"] == pytest.approx(0.51)
    assert merged[0]["wall_seconds"] == 210 + 50  # the second run's own stage only: world and CLIP were shared
    report.main(["--out", str(tmp_path / "out"), str(first), str(second)])
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| c3 | QA acc. | +0.000 | +0.000 | +0.000 ± 0.000 |" in text  # c3 − none, paired by seed (0 and 1)
    assert "- `python -m demo.pipeline --rows c3`" in text and "python -m demo.report --out" in text
    numbers = json.loads((tmp_path / "out" / "results.json").read_text())
    assert numbers["rows"]["realign"]["qa_acc"]["values"] == pytest.approx([0.6, 0.61])


@pytest.mark.parametrize("second, message", [
    (dict(rows=["realign"]), r"rows \['realign'\] are in .*b.json"),
    (dict(rows=["c3"], gap=0.6), "another CLIP gap"),
    (dict(rows=["c3"], stage1_lr=0.1), r"another recipe .*\(stage1_lr\)"),
])
def test_merge_refuses_runs_that_cannot_share_a_table(tmp_path, second, message):
    first = _run_file(tmp_path / "a.json", ["none", "realign"])
    with pytest.raises(InputError, match=message):
        merge_results([first, _run_file(tmp_path / "b.json", **second)])


def test_merge_refuses_other_seeds_with_a_clear_error(tmp_path, capsys):
    first, second = _run_file(tmp_path / "a.json", ["none"]), _run_file(tmp_path / "b.json", ["c3"])
    data = json.loads(second.read_text())
    data["per_seed"] = data["per_seed"][:1]
    second.write_text(json.dumps(data))
    with pytest.raises(SystemExit):
        report.main(["--out", str(tmp_path / "out"), str(first), str(second)])
    assert "b.json holds seeds [0]" in capsys.readouterr().err and not (tmp_path / "out").exists()

"""Scorers on hand-written cases with known results; file checks; the CLI writing metrics JSON."""
import json
import math
import shutil

import pytest

from revision.answers import attribute_hits, extract_option, normalize_answer, parse_yes_no, vqa_accuracy
from revision.eval_files import EvalError, load_answers
from revision.eval_tasks import TASKS, Task
from revision.evaluate import evaluate, evaluate_files, load_references, main

OPTIONS = {"A": "blue square", "B": "red circle", "C": "dark red", "D": "green"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"), ("(C)", "C"), ("D.", "D"), ("b", "B"), ("(a)", "A"), ("**C**", "C"), ("  d  ", "D"),
        ("A. blue square", "A"), ("(B) red circle", "B"), ("c) dark red", "C"), ("D: green", "D"),
        ("The answer is B", "B"), ("The answer is: (C).", "C"), ("Answer: (d)", "D"), ("the answer is b.", "B"),
        ("Option B: red circle", "B"), ("The correct choice is D because it is green", "D"),
        ("red circle", "B"), ("Red Circle.", "B"), ("It is a red circle", "B"),
        ("dark red", "C"), ("I see something dark red", "C"),
        ("The answer is a red circle", "B"),  # lowercase "a" after the phrase is the article
        ("A red circle", "B"),  # "A" starting a sentence is an article, not option A
        ("I think B is right", "B"),
        ("Option A is wrong, the answer is C", "C"),  # phrases conflict; "A" in a long answer is an article
        ("E", None), ("(E)", None), ("", None), ("I do not know", None), ("A or B", None),
        ("blue square or red circle", None), ("purple", None),
    ],
)
def test_extract_option(text, letter):
    assert extract_option(text, OPTIONS) == letter


def test_extract_option_without_options_accepts_any_letter():
    assert extract_option("(E)", None) == "E"
    assert extract_option("The answer is F.", {}) == "F"
    assert extract_option("a red circle", {}) is None


@pytest.mark.parametrize(
    "text, parsed",
    [("Yes", "yes"), ("yes.", "yes"), ("Yes, it is.", "yes"), ("YES", "yes"), ("  no", "no"), ("No,", "no"),
     ("No. There is no dog.", "no"), ("There is no dog.", None), ("Nope", None), ("yesterday", None), ("", None)],
)
def test_parse_yes_no(text, parsed):
    assert parse_yes_no(text) == parsed


@pytest.mark.parametrize(
    "text, normal",
    [("Two dogs.", "2 dogs"), ("The cat's toy", "cat's toy"), ("dont know", "don't know"), ("Its red", "its red"),
     ("100,978", "100978"), ("3.5 m", "3.5 m"), ("Hello-world!", "hello world"), ("none", "0"),
     ("It is 2:50 pm", "it is 2:50 pm"), ("an apple, a pear", "apple pear"), ("TEN\tyears", "10 years"),
     ("u.s.a.", "usa"), ("snake_case", "snake case")],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_vqa_accuracy_averages_leave_one_out():
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_accuracy("Red.", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)  # 7 subsets keep 3, 3 keep 2
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("green", ["red"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"]) == 1.0  # one human answer: normalised exact match


def test_attribute_hits_whole_words():
    hits = attribute_hits("A small red circle at the top-left.", {"color": "red", "size": "big", "pos": "top left"})
    assert hits == {"color": True, "size": False, "pos": True}
    assert attribute_hits("a reddish circle", {"color": "red"}) == {"color": False}


def refs_and_answers(tmp_path, refs, answers, task):
    ref_file = write_jsonl(tmp_path / "refs.jsonl", refs)
    answer_file = write_jsonl(tmp_path / "answers.jsonl", answers)
    return load_answers(answer_file), load_references(ref_file, task)


def test_mc_counts_errors_missing_unmatched_extra(tmp_path):
    refs = [
        {"question_id": 1, "answer": "B", "options": OPTIONS, "category": "color"},
        {"question_id": 2, "answer": "(a)", "options": OPTIONS, "category": "color"},
        {"question_id": 3, "answer": "green", "options": OPTIONS, "category": "shape"},  # option text as answer
        {"question_id": 4, "answer": "C", "options": OPTIONS, "category": "shape"},
        {"question_id": 5, "answer": "D", "options": OPTIONS, "category": "shape"},
    ]
    answers = [
        {"question_id": "1", "text": "The answer is B."},  # ids match as strings
        {"question_id": 2, "text": "I am not sure"},  # unmatched
        {"question_id": 3, "text": "D"},
        {"question_id": 4, "text": None, "error": "image not found: x.png"},
        {"question_id": 99, "text": "A"},  # no such question
    ]
    metrics = evaluate(*refs_and_answers(tmp_path, refs, answers, "mc"), "mc")
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    counts = [metrics[k] for k in ("n", "answered", "errors", "missing", "extra", "unmatched")]
    assert counts == [5, 3, 1, 1, 1, 1]
    assert metrics["per_category"] == {"color": {"n": 2, "accuracy": 0.5},
                                       "shape": {"n": 3, "accuracy": pytest.approx(1 / 3)}}


def test_yesno_pope_and_mme(tmp_path):
    # image 1 (existence): both right; image 2 (existence): one wrong; image 3 (count): one unknown, one error
    rows = [
        (1, 1, "existence", "yes", "Yes, there is."), (2, 1, "existence", "no", "no"),
        (3, 2, "existence", "yes", "No."), (4, 2, "existence", "no", "NO"),
        (5, 3, "count", "yes", "maybe"), (6, 3, "count", "no", None),
    ]
    refs = [{"question_id": q, "image_id": i, "category": c, "answer": a} for q, i, c, a, _ in rows]
    answers = [{"question_id": q, "text": t} if t else {"question_id": q, "error": "corrupt image"}
               for q, _, _, _, t in rows]
    metrics = evaluate(*refs_and_answers(tmp_path, refs, answers, "yesno"), "yesno")
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert (metrics["unknown"], metrics["errors"]) == (1, 1)
    assert metrics["confusion"] == {"tp": 1, "fp": 0, "tn": 2, "fn": 2}
    assert (metrics["precision"], metrics["recall"]) == (1.0, pytest.approx(1 / 3))
    assert metrics["f1"] == pytest.approx(0.5)
    assert metrics["yes_ratio"] == pytest.approx(1 / 6)
    mme = metrics["mme"]["per_category"]
    assert mme["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert mme["count"] == {"acc": 0.0, "acc_plus": 0.0, "score": 0.0}
    assert (metrics["mme"]["total"], metrics["mme"]["perception"], metrics["mme"]["cognition"]) == (125.0, 125.0, 0.0)


def test_yesno_without_image_ids_has_no_mme(tmp_path):
    loaded = refs_and_answers(tmp_path, [{"question_id": 1, "answer": "No"}], [{"question_id": 1, "text": "no"}], "yesno")
    metrics = evaluate(*loaded, "yesno")
    assert metrics["accuracy"] == 1.0 and "mme" not in metrics


def test_short_exact_and_soft(tmp_path):
    refs = [
        {"question_id": 1, "answer": "2"},
        {"question_id": 2, "answer": "red"},
        {"question_id": 3, "answers": ["cat"] * 3 + ["dog"] * 7},
        {"question_id": 4, "answers": [{"answer": "left"}] * 10},  # VQA's own list layout
    ]
    answers = [{"question_id": 1, "text": "Two."}, {"question_id": 2, "text": "dark red"},
               {"question_id": 3, "text": "A cat"}, {"question_id": 4, "text": "left"}]
    metrics = evaluate(*refs_and_answers(tmp_path, refs, answers, "short"), "short")
    assert metrics["accuracy"] == pytest.approx((1 + 0 + 0.9 + 1) / 4)


def test_caption_attributes(tmp_path):
    refs = [
        {"question_id": 1, "attributes": {"color": "red", "shape": "circle", "position": "top left"}},
        {"question_id": 2, "attributes": {"color": "blue", "shape": "square"}},
        {"question_id": 3, "attributes": {"color": "green", "shape": "triangle"}},
    ]
    answers = [{"question_id": 1, "text": "A red circle at the top-left."},
               {"question_id": 2, "text": "a blue circle"}, {"question_id": 3, "error": "missing image"}]
    metrics = evaluate(*refs_and_answers(tmp_path, refs, answers, "caption"), "caption")
    assert metrics["attributes"]["overall"] == pytest.approx(4 / 7)
    assert metrics["attributes"]["all_correct"] == pytest.approx(1 / 3)
    per_attribute = metrics["attributes"]["per_attribute"]
    assert per_attribute == {"color": pytest.approx(2 / 3), "position": 1.0, "shape": pytest.approx(1 / 3)}
    assert "caption_metrics" not in metrics  # no reference captions


NEEDS_JAVA = pytest.mark.skipif(not shutil.which("java"), reason="the PTB tokenizer needs java")


@pytest.mark.parametrize("tokenizer", ["simple", pytest.param("ptb", marks=NEEDS_JAVA)])
def test_caption_coco_metrics(tmp_path, tokenizer):
    pytest.importorskip("pycocoevalcap")
    refs = [{"question_id": 1, "answers": ["a red circle on the left", "a small red circle"]},
            {"question_id": 2, "answer": "a blue square at the top"},
            {"question_id": 3, "answer": "a green triangle in the middle"}]
    answers = [{"question_id": 1, "text": "A red circle on the left."},
               {"question_id": 2, "text": "a blue square at the top"}, {"question_id": 3, "error": "corrupt image"}]
    metrics = evaluate(*refs_and_answers(tmp_path, refs, answers, "caption"), "caption", tokenizer=tokenizer)
    scores = metrics["caption_metrics"]
    assert scores["tokenizer"] == tokenizer and scores["n"] == 3
    # every candidate word is right, but 12 candidate words against 18 closest-reference words: brevity penalty
    assert scores["BLEU-1"] == pytest.approx(math.exp(1 - 18 / 12), abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(2 / 3)  # two exact captions, one empty
    assert scores["CIDEr"] > 0


@pytest.mark.parametrize(
    "refs, answers, message",
    [
        ([{"question_id": 1}], [], "has no 'answer' or 'answers'"),
        ([{"question_id": 1, "answer": "E", "options": OPTIONS}], [], "is not one of the options"),
        ([{"question_id": 1, "answer": "B"}, {"question_id": 1, "answer": "C"}], [], "already given at"),
        ([{"question_id": 1, "answer": "B"}], [{"question_id": 1}], "neither a string 'text' nor an 'error'"),
        ([{"answer": "B"}], [], "with a question_id"),
        ([{"question_id": 1, "answer": "B", "options": ["red", "blue"]}], [], "'options' must be an object"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, refs, answers, message):
    ref_file = write_jsonl(tmp_path / "refs.jsonl", refs)
    answer_file = write_jsonl(tmp_path / "answers.jsonl", answers)
    with pytest.raises(EvalError, match=message) as info:
        evaluate_files(answer_file, ref_file, "mc")
    assert ".jsonl:" in str(info.value)


def test_bad_json_and_bad_yesno_reference(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "A"}\n{oops\n')
    with pytest.raises(EvalError, match=r"bad\.jsonl:2: not valid JSON"):
        load_answers(bad)
    bad.write_bytes('{"question_id": 1, "text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(EvalError, match=r"bad\.jsonl:1: not UTF-8"):
        load_answers(bad)
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"question_id": 1, "answer": "maybe"}])
    with pytest.raises(EvalError, match=r"refs\.jsonl:1: .*neither yes nor no"):
        load_references(refs, "yesno")


def test_a_task_registered_once_is_offered_by_evaluate_and_predict(tmp_path, monkeypatch):
    from revision.predict import build_parser

    def length_reference(ref, row, answers, where):
        return {**ref, "length": int(row["length"])}

    def score_length(pairs):
        return {"accuracy": sum(t is not None and len(t.split()) == r["length"] for r, t in pairs) / len(pairs)}

    monkeypatch.setitem(TASKS, "length", Task("answer has the right number of words", length_reference, score_length))
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"question_id": 1, "length": 2}, {"question_id": 2, "length": 1}])
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "red circle"}, {"question_id": 2, "text": "a b"}])
    out = tmp_path / "metrics.json"
    assert main(["--answers", str(answers), "--references", str(refs), "--task", "length", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["accuracy"] == 0.5
    assert build_parser().parse_args(["--model", "m", "--task", "length"]).task == "length"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--task", "nonsense"])


def test_cli_writes_metrics_json(tmp_path, capsys):
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"question_id": q, "answer": a} for q, a in ((1, "yes"), (2, "no"), (3, "no"))])
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "Yes."}, {"question_id": 2, "error": "x"}])
    out = tmp_path / "out" / "metrics.json"
    assert main(["--answers", str(answers), "--references", str(refs), "--task", "yesno", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert (metrics["accuracy"], metrics["errors"], metrics["missing"]) == (pytest.approx(1 / 3), 1, 1)
    assert metrics["references_file"] == str(refs)
    missing_file = str(tmp_path / "nope.jsonl")
    assert main(["--answers", missing_file, "--references", str(refs), "--task", "yesno", "--out", str(out)]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_mismatched_ids_warn_loudly_and_fail_with_strict(tmp_path, capsys, caplog):
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"question_id": q, "answer": "yes"} for q in (1, 2, 3)])
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": f"q{q}", "text": "yes"} for q in (1, 2, 3)])
    out = tmp_path / "metrics.json"
    argv = ["--answers", str(answers), "--references", str(refs), "--task", "yesno", "--out", str(out)]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert "3 of 3 references have no answer (e.g. ['1', '2', '3']) and 3 answers match no reference" in caplog.text
    assert json.loads(out.read_text())["accuracy"] == 0
    out.unlink()
    assert main([*argv, "--strict"]) == 3 and not out.exists()
    assert "answer ids do not match reference ids (--strict)" in capsys.readouterr().err


def test_non_utf8_files_name_file_and_line(tmp_path):
    (tmp_path / "refs.jsonl").write_bytes(b'{"question_id": 1, "answer": "yes"}\n{"question_id": 2, "answer": "s\xed"}\n')
    with pytest.raises(EvalError, match=r"refs\.jsonl:2: not UTF-8 \(byte 0xed"):
        load_references(tmp_path / "refs.jsonl", "yesno")

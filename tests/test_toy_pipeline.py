"""The whole toy pipeline in miniature (mini world, a few training steps): every stage runs through the real
scripts, and the table and every artifact it promises exist and load."""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from demo import pipeline
from demo.transfer import transfer
from revision.data import EmbeddingTable
from revision.model import RevisionModel
from revision.store import EmbeddingStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(mini_demo):
    return mini_demo


def test_table_and_artifacts(demo):
    run = demo / "seed-0"
    results = json.loads((demo / "results.json").read_text())
    assert set(results["rows"]) == {"realign", "no_stage1"}
    realign = {key: value["mean"] for key, value in results["rows"]["realign"].items()}
    report = json.loads((run / "align" / "realign" / "gap_report.json").read_text())
    before, after = report["before"], report["after"]
    # the row's gap numbers are the method's gap report's: the toy CLIP's wide gap (a probe tells the modalities
    # apart), which ReAlign closes (centroids matched, the probe near chance)
    assert realign["centroid_distance_before"] == before["centroid_distance"] == pytest.approx(1.265, rel=0.02)
    assert realign["linear_probe_acc_before"] == before["linear_probe_acc"] == 1.0
    assert realign["centroid_distance_after"] == after["centroid_distance"] < 0.01
    assert realign["linear_probe_acc_after"] == after["linear_probe_acc"] <= 0.6
    # two steps a stage of the toy LLM; rel 0.02 leaves room for the toy CLIP's 800 CPU steps before them
    assert [realign["stage1_loss"], realign["stage2_loss"]] == pytest.approx([2.985, 2.748], rel=0.02)
    assert realign["qa_acc"] * 24 == round(realign["qa_acc"] * 24) and 0 <= realign["caption_acc"] <= 1  # 24 questions
    assert 0 < realign["seconds"] < json.loads((run / "results.json").read_text())["wall_seconds"]
    assert "caption_acc" not in results["rows"]["no_stage1"]  # no stage-1 checkpoint to caption with
    # stage 1 captioned its own held-out source too: the eval captions through ReAlign's text map, fed unmapped
    source = [json.loads(line) for line in (run / "runs" / "realign" / "source_caption_answers.jsonl").read_text().splitlines()]
    assert len(source) == 12 and all("text" in a for a in source)
    seed_row = json.loads((run / "results.json").read_text())["rows"]["realign"]
    assert 0 <= realign["source_caption_acc"] <= 1 and set(seed_row) >= {"caption_colour", "source_caption_shape", "caption_by_objects"}
    aligned = EmbeddingStore(run / "align_eval" / "realign")
    assert aligned.kind == "text" and len(aligned.load_all().ids) == 12
    table = (demo / "results.md").read_text()
    assert "| realign |" in table and "| no_stage1 |" in table and "Regenerate:" in table
    # the per-category figures come with how far one seed's can be from the model's own accuracy
    counts = json.loads((run / "results.json").read_text())["rows"]["realign"]["qa_per_category_n"]
    assert sum(counts.values()) == 24
    accuracy = json.loads((run / "results.json").read_text())["rows"]["realign"]["qa_per_category"]
    largest = max((a * (1 - a) / counts[c]) ** 0.5 for c, a in accuracy.items())
    assert "questions a category: its binomial SE is " in table and f"-{largest:.3f} (realign, seed 0)" in table
    # the CLIP's gap before alignment beside the paper's LLM2CLIP, from the method's gap report
    assert f"| this world | {before['centroid_distance']:.4f} | {before['linear_probe_acc']:.4f} |" in table
    assert "| LLM2CLIP (paper) | 0.39 | — | 0.0032 |" in table
    # it ends with held-out questions, the model's answers and the truth
    questions = [json.loads(line) for line in (run / "world" / "eval_questions.jsonl").read_text().splitlines()]
    shown = table.split("Held-out questions about unseen images (realign, seed-0):\n")[1].splitlines()
    assert len(shown) == 6 and f"truth: {questions[0]['answer']!r}" in shown[0] and questions[0]["text"] in shown[0]
    assert (run / "align" / "realign" / "gap_report.png").stat().st_size > 0
    assert EmbeddingStore(run / "align" / "realign").kind == "text"
    assert len(EmbeddingTable(run / "embeds" / "eval" / "image")) == 12  # the mini world's eval images
    for stage in ("stage1", "stage2"):
        model = RevisionModel.from_pretrained(run / "runs" / "realign" / stage)
        assert model.revision_config.template == ("plain" if stage == "stage1" else "chat")
        assert model.alignment.method == "realign"
    # stage 2 ran in the short form: projector and alignment came from the stage-1 folder
    launched = [line for line in (run / "logs" / "realign.stage2.log").read_text().splitlines()
                if line.startswith("+ ") and " train.py " in line]
    assert launched and "--pretrain_mm_mlp_adapter" in launched[0] and "--align_stats" not in launched[0]
    answers = [json.loads(line) for line in (run / "runs" / "realign" / "qa_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 24 and all("text" in a for a in answers)
    assert (run / "done" / "realign.stage2.json").is_file() and (run / "logs" / "realign.stage2.log").is_file()


def test_blind_baseline_answers_without_image_information(demo):
    """qa_acc_blind: the same checkpoint, every eval image replaced by the unpaired set's mean image embedding."""
    import numpy as np

    run = demo / "seed-0"
    results = json.loads((demo / "results.json").read_text())
    for row in ("realign", "no_stage1"):
        assert 0 <= results["rows"][row]["qa_acc_blind"]["mean"] <= 1
    blind = EmbeddingStore(run / "embeds" / "eval_blind" / "image").load_all()
    seen = EmbeddingStore(run / "embeds" / "eval" / "image").load_all()
    assert list(blind.ids) == list(seen.ids)
    mean = EmbeddingStore(run / "embeds" / "unpaired" / "image").load_all().embeds.astype(np.float64).mean(0)
    assert np.allclose(blind.embeds, mean / np.linalg.norm(mean), atol=1e-6)
    # blind, an answer depends on the question alone: one answer per distinct question text
    answers = [json.loads(line) for line in (run / "runs" / "realign" / "qa_answers_blind.jsonl").read_text().splitlines()]
    questions = {q["question_id"]: q["text"] for q in map(json.loads, (run / "world" / "eval_questions.jsonl").read_text().splitlines())}
    by_text: dict[str, set] = {}
    for a in answers:
        by_text.setdefault(questions[a["question_id"]], set()).add(a["text"])
    assert len(answers) == 24 and all(len(v) == 1 for v in by_text.values()) and not any("error" in a for a in answers)
    # every question's image is in the blind store by its path, so prediction never opened the image file
    table = EmbeddingTable(run / "embeds" / "eval_blind" / "image")
    paths = [q["image"] for q in map(json.loads, (run / "world" / "eval_questions.jsonl").read_text().splitlines())]
    assert (table.lookup(paths) >= 0).all()
    table = (demo / "results.md").read_text()
    assert "QA acc. blind" in table and " blind: " in table
    assert "Linear probes of the CLIP's embeddings" in table and "| image |" in table


def test_transfer_readout_on_the_run(demo):
    results = transfer(demo / "seed-0", ["realign"])
    assert set(results) == {"image->image", "realign"}
    for accuracy in results.values():
        assert set(accuracy) == {"colour", "shape", "size", "position"} and all(0 <= a <= 1 for a in accuracy.values())


def test_rerun_resumes_from_finished_stages(demo, capsys):
    pipeline.main(["--out", str(demo), "--preset", "mini", "--rows", "no_stage1", "--repo", str(REPO)])
    printed = capsys.readouterr().out
    assert "no_stage1.stage2" in printed and "cached" in printed and " s\n" in printed
    assert f"python -m revision.serve --model {demo / 'seed-0/runs/no_stage1/stage2'}\n" in printed  # the web demo
    # which stages run is not the recipe: the same folder gives the stage-1 table from the same checkpoints
    pipeline.main(["--out", str(demo), "--preset", "mini", "--rows", "realign", "--stage2", "false", "--repo", str(REPO)])
    stage1_only = json.loads((demo / "results.json").read_text())["rows"]["realign"]
    printed = capsys.readouterr().out
    stages = [line for line in printed.splitlines() if line.startswith("[seed-0] ")]
    assert "realign.stage2" not in printed and "realign.predict_captions" in printed
    assert stages and all("cached" in line for line in stages)  # nothing trained or predicted again
    assert "caption_acc" in stage1_only and "qa_acc" not in stage1_only and "stage2_loss" not in stage1_only


def test_stage1_only_needs_captions_and_stage1_rows(demo):
    for flags in (["--captions", "false"], ["--rows", "realign,no_stage1"]):
        with pytest.raises(SystemExit):
            pipeline.main(["--out", str(demo / "other"), "--preset", "mini", "--stage2", "false", *flags])
    assert not (demo / "other").exists()


def test_rerun_with_other_settings_is_refused(demo):
    with pytest.raises(ValueError, match="holds a run with other settings"):
        pipeline.main(["--out", str(demo), "--preset", "mini", "--rows", "no_stage1", "--stage2_lr", "0.5", "--repo", str(REPO)])


def test_a_run_folder_of_an_older_world_generator_is_refused(tmp_path):
    """Its finished stages trained on the world that generator wrote (the same seed gives other conversations now)."""
    from demo.world import WORLD_VERSION

    pipeline.Runner(tmp_path / "seed-0", 0, pipeline.BUDGETS["mini"], REPO)
    saved = tmp_path / "seed-0" / "settings.json"
    settings = json.loads(saved.read_text())
    assert settings["world_version"] == WORLD_VERSION
    saved.write_text(json.dumps(settings | {"world_version": WORLD_VERSION - 1}))
    with pytest.raises(ValueError, match="holds a run with other settings"):
        pipeline.Runner(tmp_path / "seed-0", 0, pipeline.BUDGETS["mini"], REPO)


def test_a_run_folder_from_before_a_budget_field_resumes_as_its_default(tmp_path):
    """A field is added with the default that does what was done before it: a folder whose settings lack it resumes;
    one that saved another value, or lacks the world's version, does not."""
    pipeline.Runner(tmp_path / "seed-0", 0, pipeline.BUDGETS["mini"], REPO)
    saved = tmp_path / "seed-0" / "settings.json"
    settings = json.loads(saved.read_text())
    assert settings["projector"] == "mlp2x_gelu"
    saved.write_text(json.dumps({k: v for k, v in settings.items() if k != "projector"}))
    pipeline.Runner(tmp_path / "seed-0", 0, pipeline.BUDGETS["mini"], REPO)  # resumes
    for changed in (settings | {"projector": "linear"}, {k: v for k, v in settings.items() if k != "world_version"}):
        saved.write_text(json.dumps(changed))
        with pytest.raises(ValueError, match="holds a run with other settings"):
            pipeline.Runner(tmp_path / "seed-0", 0, pipeline.BUDGETS["mini"], REPO)


def test_background_stage_runs_beside_others_and_fails_like_any_stage(tmp_path, capsys):
    run = pipeline.Runner(tmp_path / "seed-0", 0, pipeline.BUDGETS["mini"], REPO)
    flag = tmp_path / "started"
    waiting = run.background("slow", [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(flag)!r}).touch(); "
                                                            "time.sleep(1.5); print('slow done')"])
    run.overlapped.add("slow")
    run("quick", lambda: print("quick done"))  # in this process while the other one runs
    assert "slow" not in run.times  # not waited for yet
    time.sleep(4)
    assert 1.5 <= waiting() < 4 and flag.is_file()  # its own time, not the time until it was waited for
    assert "slow done" in (tmp_path / "seed-0/logs/slow.log").read_text()
    assert json.loads((tmp_path / "seed-0/done/slow.json").read_text())["seconds"] >= 1.5
    again = pipeline.Runner(tmp_path / "seed-0", 0, pipeline.BUDGETS["mini"], REPO)
    flag.unlink()
    assert again.background("slow", [sys.executable, "-c", "raise SystemExit(3)"])() >= 1.5  # finished before: not started
    assert not flag.exists() and "slow                         cached" in capsys.readouterr().out
    failing = again.background("broken", [sys.executable, "-c", "print('what went wrong'); raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match=r"stage broken failed \(exit 3\)(.|\n)*what went wrong"):
        failing()
    assert not (tmp_path / "seed-0/done/broken.json").exists()


def test_the_llm_link_follows_the_conversion_this_machine_has(tmp_path):
    """RUN/llm pointing at a conversion that is gone (a run folder from another machine, an older converter's cache
    key) is pointed at the one given; a second call changes nothing; a real folder in its place is not replaced."""
    old, new, link = tmp_path / "old", tmp_path / "new", tmp_path / "run" / "llm"
    old.mkdir(), new.mkdir(), link.parent.mkdir()
    link.symlink_to(old, target_is_directory=True)
    old.rmdir()  # dangling now
    pipeline.point_at(link, new)
    assert link.is_symlink() and link.resolve() == new.resolve()
    pipeline.point_at(link, new)
    assert link.resolve() == new.resolve()
    (tmp_path / "run" / "other").mkdir()
    with pytest.raises(FileExistsError):
        pipeline.point_at(tmp_path / "run" / "other", new)


def test_the_budgets_stage2_options_become_train_py_flags():
    from demo.budget import BUDGETS

    default = pipeline.stage2_flags(BUDGETS["default"], after_stage1=True)
    assert "--tune_llm_top_layers 15" in default and "--mm_projector_lr 0.002" in default and "--system_prompt ''" in default
    assert "--split_turns" not in default and "--image_placement" not in default and "--mm_projector_tokens" not in default
    split = pipeline.stage2_flags(replace(BUDGETS["default"], stage2_split_turns=True, image_placement="last"), True)
    assert "--split_turns true" in split and "--image_placement last" in split
    assert "--mm_projector_tokens 8" in pipeline.stage2_flags(BUDGETS["default"], after_stage1=False)

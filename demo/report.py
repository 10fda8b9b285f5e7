"""The toy pipeline's report: caption scoring, the comparison table (mean ± sample std over seeds), the per-seed
differences against a baseline row, the CLIP's gap beside the paper's LLM2CLIP, stage times, held-out examples;
and one table from runs made apart (other rows of the same seeds):

    python -m demo.report --out DIR RUN_A/results.json RUN_B/results.json
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from demo.budget import recipe
from demo.world import parse_caption
from revision.answers import normalize_answer
from revision.errors import InputError, exit_with
from revision.records import read_records

OBJECT_COUNTS = {1: "one object", 2: "two objects"}
BOUND_CATEGORIES = ("colour", "shape", "size", "position")  # questions about one object's attribute (the category names it)


def caption_scores(answers: Path, world: Path) -> dict[str, Any]:
    """Attribute accuracy of generated captions: each scene object is matched to the parsed object that
    names most of its attributes (each parsed object used once); shares of (object, attribute) named right.
    `strict`: the same, counting a hit only when the caption names as many objects as the scene has: a model
    that always describes two objects, one big and one small, would otherwise get size right for free. Strict hits
    are also split by the scene's number of objects, and by that and the attribute (a text row can learn what one-object
    captions say and not two-object ones: the split shows where its own source is learned well enough to judge it)."""
    refs = {r["id"]: r["attributes"] for r in read_records(world / "eval_captions.jsonl")}
    kinds = ("colour", "shape", "size", "position")
    hits: dict[str, list[bool]] = {k: [] for k in kinds}
    strict: dict[str, list[bool]] = {k: [] for k in kinds}
    all_right, count_right = [], []
    by_objects: dict[str, dict[str, list[bool]]] = {}  # strict hits by the scene's number of objects and the attribute
    for row in read_records(answers):
        said = parse_caption(row.get("text") or "")
        objects = refs[row["question_id"]]["objects"]
        count = OBJECT_COUNTS.get(len(objects), f"{len(objects)} objects")
        scene = by_objects.setdefault(count, {k: [] for k in kinds})
        free, right = list(said), True
        for obj in objects:
            best = max(free, key=lambda p: sum(p[k] == obj[k] for k in kinds), default=None)
            if best is not None:
                free.remove(best)
            for k in kinds:
                hit = best is not None and best[k] == obj[k]
                hits[k].append(hit)
                strict[k].append(hit and len(said) == len(objects))
                scene[k].append(strict[k][-1])
                right &= hit
        all_right.append(right and not free)
        count_right.append(len(said) == len(objects))
    return {"n": len(all_right), "attribute_acc": float(np.mean([h for v in hits.values() for h in v])),
            "per_attribute": {k: float(np.mean(v)) for k, v in hits.items()},
            "strict_attribute_acc": float(np.mean([h for v in strict.values() for h in v])),
            "strict_per_attribute": {k: float(np.mean(v)) for k, v in strict.items()},
            "strict_by_objects": {n: float(np.mean(sum(per.values(), []))) for n, per in sorted(by_objects.items())},
            "strict_by_objects_attribute": {f"{k}, {n}": float(np.mean(v)) for n, per in sorted(by_objects.items())
                                            for k, v in per.items()},  # keys as qa_binding's: "colour, one object"
            "count_acc": float(np.mean(count_right)), "all_correct": float(np.mean(all_right))}


def qa_binding(answers: Path, world: Path) -> dict[str, dict[str, float]]:
    """The held-out QA answers by category and the scene's number of objects (`accuracy`, keys "colour, two objects";
    `n`, the questions of each),
    and `swaps`: on two-object scenes whose objects differ in the attribute asked, the share of answers that name the
    *other* object's value, per category: the model saw the attribute but not which object holds it (binding), as
    against naming a value neither object has (not seen)."""
    scenes = {r["id"]: r["attributes"]["objects"] for r in read_records(world / "scenes.jsonl") if r["split"] == "eval"}
    questions = {q["question_id"]: q for q in read_records(world / "eval_questions.jsonl")}
    hits: dict[str, list[bool]] = {}
    swaps: dict[str, list[bool]] = {}
    for row in read_records(answers):
        question = questions[row["question_id"]]
        category, objects, said = question["category"], scenes[question["image_id"]], normalize_answer(row.get("text") or "")
        right = said == normalize_answer(question["answer"])
        hits.setdefault(f"{category}, {OBJECT_COUNTS.get(len(objects), f'{len(objects)} objects')}", []).append(right)
        values = {normalize_answer(o[category]) for o in objects} if category in BOUND_CATEGORIES else set()
        if len(objects) == 2 and len(values) == 2:
            swaps.setdefault(category, []).append(not right and said in values)
    return {"accuracy": {k: float(np.mean(v)) for k, v in sorted(hits.items())},
            "swaps": {k: float(np.mean(v)) for k, v in sorted(swaps.items())},
            "n": {k: len(v) for k, v in sorted(hits.items())}}


COLUMNS = (("centroid_distance_before", "centroid dist. before", 3), ("centroid_distance_after", "centroid dist. after", 3),
           ("linear_probe_acc_before", "probe acc. before", 3), ("linear_probe_acc_after", "probe acc. after", 3),
           ("caption_acc", "caption attr. acc. (strict)", 3), ("caption_count_acc", "caption count acc.", 3),
           ("source_caption_acc", "same, held-out source (strict)", 3),
           ("qa_acc", "QA acc.", 3), ("qa_acc_blind", "QA acc. blind", 3), ("stage1_loss", "stage-1 loss (end)", 3),
           ("stage2_loss", "stage-2 loss (end)", 3),
           ("seconds", "wall s", 0))


def _cell(values: list[float], digits: int, signed: bool = False) -> str:
    if not values:
        return "—"
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.{digits}f}"
    return f"{np.mean(values):{sign}.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table(summaries: list[dict]) -> tuple[str, dict]:
    """The markdown table (mean ± sample std over seeds) and its numbers."""
    rows = list(summaries[0]["rows"])
    numbers = {row: {key: [s["rows"][row][key] for s in summaries if key in s["rows"][row]] for key, _, _ in COLUMNS}
               for row in rows}
    lines = ["| row | " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(_cell(numbers[row][key], d) for key, _, d in COLUMNS) + " |")
    for key, title in (("caption_per_attribute", "Stage-1 captions of held-out real images: accuracy per attribute (strict)"),
                       ("source_caption_per_attribute", "The same checkpoints on their own held-out source (the eval "
                        "images' reference captions through the row's text map): accuracy per attribute (strict)"),
                       ("caption_by_objects", "Stage-1 captions of held-out real images by the scene's number of objects "
                        "(strict attribute accuracy)"),
                       ("source_caption_by_objects", "The same on their own held-out source, by the scene's number of objects"),
                       ("caption_by_objects_attribute", "Stage-1 captions of held-out real images by attribute and the scene's "
                        "number of objects (strict)"),
                       ("source_caption_by_objects_attribute", "The same on their own held-out source, by attribute and the "
                        "scene's number of objects: where a row learned its source (>= 0.8), its real-image figure beside it "
                        "says what the text-to-image step costs"),
                       ("qa_per_category", "QA accuracy per question category"),
                       ("qa_per_category_blind", "QA accuracy per question category, blind (every image the mean image embedding)"),
                       ("qa_by_objects", "QA accuracy by category and the scene's number of objects"),
                       ("qa_swaps", "Two-object scenes whose objects differ in the attribute asked: share of answers naming the "
                        "other object's value (binding swaps; the rest of the wrong answers name neither object's)")):
        if any(key in r for s in summaries for r in s["rows"].values()):  # no captions asked (--captions false): none
            lines += ["", f"{title}:", "", *_breakdown(summaries, rows, key)]
            if key == "qa_per_category" and (note := standard_error_note(summaries, rows)):
                lines += ["", note]
    return "\n".join(lines), {"rows": {r: {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                                                 "values": v} for k, v in numbers[r].items() if v} for r in rows}}


def binomial_se(accuracy: float, n: int) -> float:
    """The standard error of an accuracy measured on n questions (nan for none)."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")


def standard_error_note(summaries: list[dict], rows: list[str]) -> str:
    """How far one seed's per-category QA figure may be from the model's own accuracy: the binomial SE at its n (the
    first row that has the counts, its first seed); empty for runs recorded before the counts were."""
    row = next((r for r in rows if "qa_per_category_n" in summaries[0]["rows"][r]), None)
    if row is None:
        return ""
    counts, accuracy = summaries[0]["rows"][row]["qa_per_category_n"], summaries[0]["rows"][row]["qa_per_category"]
    errors = [binomial_se(accuracy[c], n) for c, n in counts.items() if n]
    low, high = min(counts.values()), max(counts.values())
    return (f"Each figure of one seed is a share of {low if low == high else f'{low}-{high}'} questions a category: its "
            f"binomial SE is {min(errors):.3f}-{max(errors):.3f} ({row}, seed {summaries[0]['seed']}); "
            "`python -m demo.heldout` scores a run's checkpoints on 2000 more.")


def _breakdown(summaries: list[dict], rows: list[str], key: str) -> list[str]:
    """Markdown lines of a per-row table over the sub-keys of a dict-valued metric (mean ± std over seeds)."""
    columns = sorted({c for s in summaries for r in s["rows"].values() for c in r.get(key, {})})
    lines = ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(
            _cell([s["rows"][row][key][c] for s in summaries if c in s["rows"][row].get(key, {})], 3) for c in columns) + " |")
    return lines


GAP_KEYS = ("centroid_distance", "linear_probe_acc", "knn_mixing", "trace_ratio", "alpha_text", "alpha_image", "cosine_js")
# The paper's LLM2CLIP figures (100k samples, before alignment); None: not given there
PAPER_LLM2CLIP_GAP = {"centroid_distance": 0.39, "knn_mixing": 0.0032, "alpha_text": 1.33, "alpha_image": 1.83}


def gap_table(gaps: list[dict]) -> str:
    """The world CLIP's gap before alignment (unpaired captions vs images, revision.gap) beside the paper's LLM2CLIP."""
    lines = ["CLIP gap before alignment (unpaired captions vs unpaired images), beside the paper's LLM2CLIP:", "",
             "| | " + " | ".join(GAP_KEYS) + " |", "|---" * (len(GAP_KEYS) + 1) + "|",
             "| this world | " + " | ".join(_cell([g[k] for g in gaps], 4) for k in GAP_KEYS) + " |",
             "| LLM2CLIP (paper) | " + " | ".join(f"{PAPER_LLM2CLIP_GAP[k]:g}" if k in PAPER_LLM2CLIP_GAP else "—"
                                                  for k in GAP_KEYS) + " |"]
    return "\n".join(lines)


def probe_table(probes: list[dict]) -> str:
    """What the CLIP's embeddings carry: linear-probe accuracy per attribute (demo.probes), mean ± std over seeds."""
    probes = [p for p in probes if "skipped" not in p]
    if not probes:
        return "Attribute probes: skipped (world too small)."
    names = list(probes[0]["image"])
    lines = ["Linear probes of the CLIP's embeddings (held-out half of the unpaired set; one-object scenes, count over all, "
             "two-object: each object's attribute, objects in reading order):", "",
             "| embeddings | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for kind in ("image", "text"):
        lines.append(f"| {kind} | " + " | ".join(_cell([p[kind][n]["acc"] for p in probes], 3) for n in names) + " |")
    lines.append("| chance | " + " | ".join(_cell([p["image"][n]["chance"] for p in probes], 3) for n in names) + " |")
    return "\n".join(lines)


def held_out_examples(run_dir: Path, row: str, count: int) -> str:
    """The first `count` held-out questions with the row's answers, its blind answers (every image replaced by the
    mean image embedding) and the truth, as printed lines."""
    def answers(name: str) -> dict[str, str]:
        path = run_dir / "runs" / row / name
        return {a["question_id"]: a.get("text") or a.get("error", "") for a in read_records(path)} if path.is_file() else {}

    seen, blind = answers("qa_answers.jsonl"), answers("qa_answers_blind.jsonl")
    questions = read_records(run_dir / "world" / "eval_questions.jsonl")[:count]
    lines = [f"Held-out questions about unseen images ({row}, {run_dir.name}):"]
    lines += [f"  {q['image']}  Q: {q['text']!r}  model: {seen.get(q['question_id'])!r}  blind: "
              f"{blind.get(q['question_id'])!r}  truth: {q['answer']!r}" for q in questions]
    return "\n".join(lines)


def stage_table(summaries: list[dict]) -> str:
    names = list(summaries[0]["stage_seconds"])
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {n} | {_cell([s['stage_seconds'][n] for s in summaries if n in s['stage_seconds']], 1)} |" for n in names]
    lines.append(f"| whole seed | {_cell([s['wall_seconds'] for s in summaries], 1)} |")
    return "\n".join(lines)


DIFF_KEYS = (("qa_acc", "QA acc."), ("caption_acc", "caption attr. acc. (strict)"),
             *((f"caption_{k}", f"caption {k} (strict)") for k in ("colour", "shape", "size", "position")))


def difference_table(summaries: list[dict], baseline: str = "none") -> str:
    """Each row minus `baseline` on the same seed (same world, CLIP and stores), per seed and mean ± std: the
    paired comparison, which removes the seed-to-seed spread that the plain table's std carries."""
    rows = [r for r in summaries[0]["rows"] if r != baseline]
    seeds = [s["seed"] for s in summaries]
    lines = [f"Per-seed differences against `{baseline}` (row − {baseline}, same seed):", "",
             "| row | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---" * (len(seeds) + 3) + "|"]
    for key, title in DIFF_KEYS:
        for row in rows:
            diffs = [s["rows"][row][key] - s["rows"][baseline][key] if key in s["rows"][row] and key in s["rows"][baseline]
                     else None for s in summaries]
            if all(d is None for d in diffs):
                continue
            cells = ["—" if d is None else f"{d:+.3f}" for d in diffs]
            lines.append(f"| {row} | {title} | " + " | ".join(cells) + f" | {_cell([d for d in diffs if d is not None], 3, signed=True)} |")
    return "\n".join(lines)


def results_document(summaries: list[dict], title: str, command: str, baseline: str = "none") -> tuple[str, dict]:
    """results.md's text (the table, the differences against `baseline`, the gap, stage times, probes) and the
    numbers of results.json."""
    markdown, numbers = table(summaries)
    rows = list(summaries[0]["rows"])
    if baseline in rows and len(rows) > 1:
        markdown += "\n\n" + difference_table(summaries, baseline)
    return (f"# {title}\n\nRegenerate: `{command}`\n\n{markdown}\n\n{gap_table([s['clip'] for s in summaries])}\n\n"
            f"Stage times (s):\n\n{stage_table(summaries)}\n\n{probe_table([s['probes'] for s in summaries])}\n"), numbers


def merge_results(files: Sequence[Path]) -> list[dict]:
    """The per-seed summaries of several results.json files as one run's: rows of the same seeds run apart (other
    streams, other machines). An InputError when the files' seeds differ, a row of a seed is in two files, or a
    seed's recipe or CLIP gap differs (another world or encoder: their rows cannot share a table)."""
    runs = [(Path(f), json.loads(Path(f).read_text())["per_seed"]) for f in files]
    first, merged = runs[0][0], [dict(s, rows=dict(s["rows"]), stage_seconds=dict(s["stage_seconds"])) for s in runs[0][1]]
    for path, summaries in runs[1:]:
        seeds = [s["seed"] for s in summaries]
        if seeds != [s["seed"] for s in merged]:
            raise InputError(f"{path} holds seeds {seeds}, {first} seeds {[s['seed'] for s in merged]}: merge runs of the same seeds")
        for into, summary in zip(merged, summaries):
            seed = summary["seed"]
            differs = sorted(k for k in recipe(into["budget"]).keys() | recipe(summary["budget"]).keys()
                             if into["budget"].get(k) != summary["budget"].get(k))
            if differs:
                raise InputError(f"seed {seed}: {path} ran another recipe than {first} ({', '.join(differs)})")
            if not np.allclose([into["clip"][k] for k in GAP_KEYS], [summary["clip"][k] for k in GAP_KEYS], rtol=1e-6):
                raise InputError(f"seed {seed}: {path} measured another CLIP gap than {first} (another world or encoder): "
                                 "their rows cannot share a table")
            if twice := sorted(into["rows"].keys() & summary["rows"].keys()):
                raise InputError(f"seed {seed}: rows {twice} are in {path} and in an earlier file: merge each row once")
            into["rows"].update(summary["rows"])
            new = {n: t for n, t in summary["stage_seconds"].items() if n not in into["stage_seconds"]}
            into["stage_seconds"].update(new)
            into["wall_seconds"] += sum(new.values())  # the stages this run did not share with the earlier ones
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One table from several runs' results.json (other rows of the same "
                                                 "seeds, run apart): OUT/results.md and OUT/results.json")
    parser.add_argument("--out", required=True, help="folder for results.md and results.json")
    parser.add_argument("--baseline", default="none", help="the row the per-seed differences are taken against")
    parser.add_argument("files", nargs="+", type=Path, help="results.json of each run (OUT/results.json of demo.pipeline)")
    args = parser.parse_args(argv)
    try:
        summaries = merge_results(args.files)
    except (InputError, OSError, KeyError, ValueError) as e:
        exit_with(e if isinstance(e, InputError) else InputError(f"cannot merge {args.files}: {e}"), prog=parser.prog)
    sources = [json.loads(f.read_text())["command"] for f in args.files]
    seeds = ",".join(str(s["seed"]) for s in summaries)
    command = "python -m demo.report " + shlex.join(argv if argv is not None else sys.argv[1:])
    text, numbers = results_document(summaries, f"Embedded-world results (merged from {len(args.files)} runs; seeds {seeds})",
                                     command, args.baseline)
    text += "\nThe runs merged:\n\n" + "\n".join(f"- `{c}`" for c in sources) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({**numbers, "seeds": [s["seed"] for s in summaries], "command": command,
                                                  "merged": sources, "per_seed": summaries}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()

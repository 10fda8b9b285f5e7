"""The toy pipeline's report: caption scoring, the comparison table (mean ± sample std over seeds), the per-seed
differences against a baseline row, the CLIP's gap beside the paper's LLM2CLIP, stage times, held-out examples."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from demo.world import parse_caption
from revision.records import read_records


def caption_scores(answers: Path, world: Path) -> dict[str, Any]:
    """Attribute accuracy of generated captions: each scene object is matched to the parsed object that
    names most of its attributes (each parsed object used once); shares of (object, attribute) named right.
    `strict`: the same, counting a hit only when the caption names as many objects as the scene has: a model
    that always describes two objects, one big and one small, would otherwise get size right for free."""
    refs = {r["id"]: r["attributes"] for r in read_records(world / "eval_captions.jsonl")}
    kinds = ("colour", "shape", "size", "position")
    hits: dict[str, list[bool]] = {k: [] for k in kinds}
    strict: dict[str, list[bool]] = {k: [] for k in kinds}
    all_right, count_right = [], []
    for row in read_records(answers):
        said = parse_caption(row.get("text") or "")
        objects = refs[row["question_id"]]["objects"]
        free, right = list(said), True
        for obj in objects:
            best = max(free, key=lambda p: sum(p[k] == obj[k] for k in kinds), default=None)
            if best is not None:
                free.remove(best)
            for k in kinds:
                hit = best is not None and best[k] == obj[k]
                hits[k].append(hit)
                strict[k].append(hit and len(said) == len(objects))
                right &= hit
        all_right.append(right and not free)
        count_right.append(len(said) == len(objects))
    return {"n": len(all_right), "attribute_acc": float(np.mean([h for v in hits.values() for h in v])),
            "per_attribute": {k: float(np.mean(v)) for k, v in hits.items()},
            "strict_attribute_acc": float(np.mean([h for v in strict.values() for h in v])),
            "strict_per_attribute": {k: float(np.mean(v)) for k, v in strict.items()},
            "count_acc": float(np.mean(count_right)), "all_correct": float(np.mean(all_right))}



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
                       ("qa_per_category", "QA accuracy per question category"),
                       ("qa_per_category_blind", "QA accuracy per question category, blind (every image the mean image embedding)")):
        if any(key in r for s in summaries for r in s["rows"].values()):  # no captions asked (--captions false): none
            lines += ["", f"{title}:", "", *_breakdown(summaries, rows, key)]
    return "\n".join(lines), {"rows": {r: {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                                                 "values": v} for k, v in numbers[r].items() if v} for r in rows}}


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

"""Check an embedding store before alignment: one written here or by the official `embed.py` (record layout).

    python -m revision.check_embeddings STORE [--data_json dataset.json] [--reference OTHER_STORE] [--report out.json]

Reads the store shard by shard and checks: ids unique; one embedding width; every row finite and of unit
norm (the official `embed.py` writes an all-zero row for an image it cannot read); with --data_json (the
official {"images": [...], "texts": [...]} input) that every input id of the store's kind is there and
nothing else; with --reference (the same inputs encoded another way, e.g. natively here and by the
official code under transformers 4.x) the cosine of each shared id. Exit status 1 when a check fails, 2 when the
store or the input file cannot be read (one line `error: ...`).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from revision.embedding_rows import bad_rows
from revision.errors import InputError, StoreError, report
from revision.lists import read_data_json
from revision.store import EmbeddingStore

SHOWN = 5  # example ids per problem


def check_store(root: str | Path, expected_ids: Sequence[str] | None = None, reference: str | Path | None = None,
                norm_tolerance: float = 1e-2, min_cosine: float = 0.99) -> dict[str, Any]:
    """The checks' findings: counts, example ids, and `problems` (empty when the store passes)."""
    store = EmbeddingStore(root)
    seen: set[str] = set()
    duplicates, zero, off_norm, non_finite, widths = [], [], [], [], set()
    rows = 0
    try:
        for shard in store.iter_shards():
            rows += len(shard)
            widths.add(int(shard.embeds.shape[1]))
            # unusable rows by the rule every reader applies (revision/embedding_rows.py); the rest by their norm
            unusable = bad_rows(shard.embeds)
            finite = np.isfinite(shard.embeds[unusable]).all(axis=1)
            kind_of = {int(row): "zero" if ok else "non_finite" for row, ok in zip(unusable, finite)}
            norms = np.linalg.norm(shard.embeds.astype(np.float64), axis=1)
            for i, row_id in enumerate(shard.ids):
                if row_id in seen:
                    duplicates.append(row_id)
                seen.add(row_id)
                if i in kind_of:
                    (zero if kind_of[i] == "zero" else non_finite).append(row_id)
                elif abs(norms[i] - 1) > norm_tolerance:
                    off_norm.append(row_id)
    except StoreError as e:  # e.g. shards of different widths
        return {"store": str(root), "kind": store.kind, "rows": rows, "problems": [str(e)]}
    report: dict[str, Any] = {"store": str(root), "kind": store.kind, "rows": rows, "unique_ids": len(seen),
                              "dims": sorted(widths), "duplicate_ids": duplicates[:SHOWN], "zero_rows": zero[:SHOWN],
                              "off_norm_rows": off_norm[:SHOWN], "non_finite_rows": non_finite[:SHOWN]}
    problems = [f"{len(v)} {what} (e.g. {v[:SHOWN]})" for v, what in (
        (duplicates, "duplicate ids"), (zero, "all-zero rows: inputs the encoder could not read"),
        (off_norm, f"rows whose norm is off 1 by more than {norm_tolerance}"), (non_finite, "rows with NaN/inf"))
        if v]
    if len(widths) > 1:
        problems.append(f"embeddings of several widths {sorted(widths)}")
    if expected_ids is not None:
        expected = set(expected_ids)
        missing, extra = sorted(expected - seen), sorted(seen - expected)
        report.update(expected=len(expected), missing_ids=missing[:SHOWN], extra_ids=extra[:SHOWN])
        problems += [f"{len(v)} {what} (e.g. {v[:SHOWN]})" for v, what in (
            (missing, "input ids not in the store"), (extra, "store ids not among the inputs")) if v]
    if reference is not None:
        report["reference"] = compare(store, EmbeddingStore(reference), min_cosine)
        if report["reference"]["shared"] == 0:
            problems.append(f"no id shared with the reference store {reference}")
        elif report["reference"]["below"]:
            problems.append(f"{report['reference']['below']} shared ids with cosine < {min_cosine} to the reference "
                            f"(min {report['reference']['min_cosine']:.5f}, e.g. {report['reference']['worst'][:SHOWN]})")
    report["problems"] = problems
    return report


def compare(store: EmbeddingStore, reference: EmbeddingStore, min_cosine: float) -> dict[str, Any]:
    """Cosine of every id the two stores share (the reference held in memory: meant for samples)."""
    ref = reference.load_all()
    counts: dict[str, int] = {}
    for row_id in ref.ids:
        counts[row_id] = counts.get(row_id, 0) + 1
    index = {row_id: i for i, row_id in enumerate(ref.ids) if counts[row_id] == 1}  # a repeated id is ambiguous
    unit = ref.embeds.astype(np.float64)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    cosines: list[tuple[float, str]] = []
    for shard in store.iter_shards():
        for row_id, row in zip(shard.ids, shard.embeds.astype(np.float64)):
            if row_id in index and row.shape == unit[index[row_id]].shape:
                cosines.append((float(row @ unit[index[row_id]] / max(np.linalg.norm(row), 1e-12)), row_id))
    values = np.array([c for c, _ in cosines]) if cosines else np.zeros(0)
    return {"shared": len(cosines), "min_cosine": float(values.min()) if cosines else None,
            "mean_cosine": float(values.mean()) if cosines else None, "below": int((values < min_cosine).sum()),
            "worst": [i for _, i in sorted(cosines)[:SHOWN]]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="a store folder (manifest.json) or a folder of official-layout *.pkl shards")
    parser.add_argument("--data_json", help="the official input file: the store's kind of ids must all be there")
    parser.add_argument("--reference", help="another store of the same inputs: cosine per shared id")
    parser.add_argument("--norm_tolerance", type=float, default=1e-2, help="|norm - 1| allowed (float16 rows: ~1e-3)")
    parser.add_argument("--min_cosine", type=float, default=0.99)
    parser.add_argument("--report", help="write the findings as JSON here")
    args = parser.parse_args(argv)
    expected = None
    try:
        if args.data_json:
            images, texts = read_data_json(args.data_json)
            expected = [item.id for item in (images if EmbeddingStore(args.store).kind == "image" else texts)]
        findings = check_store(args.store, expected, args.reference, args.norm_tolerance, args.min_cosine)
    except (StoreError, InputError, OSError) as e:  # a folder that is no store, an unreadable input file: one line
        return report(e)
    if args.report:
        Path(args.report).write_text(json.dumps(findings, indent=1) + "\n")
    print(f"{findings['store']}: {findings['kind']} store, {findings['rows']} rows")
    for problem in findings["problems"]:
        print(f"  FAIL {problem}")
    if not findings["problems"]:
        print("  ok: ids unique, one width, unit norms" + (", every input present" if expected is not None else "")
              + (f", cosine to reference >= {args.min_cosine}" if args.reference else ""))
    return 1 if findings["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

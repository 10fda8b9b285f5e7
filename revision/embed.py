"""Embed unpaired images and texts with a CLIP-style encoder into `OUT/image/` and `OUT/text/` stores.

Inputs (ids are stable across reruns: the given id, else the image's relative path / the text's row number):
  --images DIR            every file under DIR (recursive, hidden files ignored); id = path relative to DIR
  --images LIST.txt       one image path per line (relative to --image_root, else to the list's folder)
  --images LIST.json(l)   records {"id", "image"} (a list, JSONL, or {"images": [...]})
  --texts FILE.txt        one text per line; id = line number (from 1)
  --texts FILE.jsonl      records {"id", "text" | "caption"}; --texts FILE.json: a list of records or strings
  --data_json FILE.json   the official layout {"images": [{"id", "image"}], "texts": [{"id", "text"}]}
  --images/--texts 'data/{00000..00099}.tar'   webdataset shards (img2dataset): KEY.jpg + KEY.txt/.json, id = KEY
  --images/--texts DATA.parquet (or a folder)   image bytes or paths / a caption column (--image_column, ...)
(the readers: revision/inputs.py, READERS; the encode loops: revision/encode.py). Tars and parquet files are
streamed, never listed up front.

Images are decoded and preprocessed in worker processes while this one encodes; images over --max_pixels are
refused from their header. Unreadable items are skipped, counted and listed in OUT/KIND/skipped.jsonl; an empty
input is an error. Shards are written atomically under a lock (one writer per store); a rerun resumes after
the last complete shard. Several processes (torchrun, SLURM, --num_shards/--shard_index) each encode their part
of the inputs into the same store; the last to finish writes the manifest (or --merge): docs/distributed.md.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from revision.decode import DEFAULT_MAX_PIXELS, DecodeError
from revision.distributed import Rank, detect_rank, merge_if_last, merge_parts
from revision.encode import embed_images, embed_texts
from revision.encoders import load_encoder
from revision.errors import InputError, StoreError, report
from revision.inputs import READERS, Inputs, Sample, Unit, open_inputs
from revision.lists import read_data_json
from revision.manifest import PART_GLOB, SKIPPED
from revision.store import check_unique_ids
from revision.store_writer import StoreWriter


def build_parser() -> argparse.ArgumentParser:
    """image_embed.py's flags."""
    parser = argparse.ArgumentParser(
        prog="image_embed.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", help="folder, .txt list, .json/.jsonl records, tar shards (brace patterns) or parquet")
    parser.add_argument("--texts", help=".txt (one per line), .jsonl/.json records, tar shards (.txt/.json members) or parquet")
    parser.add_argument("--data_json", help='official layout {"images": [{"id", "image"}], "texts": [{"id", "text"}]}')
    parser.add_argument("--input_format", choices=sorted(READERS), help="default: from the --images/--texts argument")
    parser.add_argument("--image_root", help="folder that relative image paths in list/JSON/parquet files start from")
    parser.add_argument("--image_column", help="parquet: column of image bytes / paths (default: image, jpg, ...)")
    parser.add_argument("--text_column", help="parquet: caption column (default: caption, text, txt)")
    parser.add_argument("--id_column", help="parquet: id column (default: key, id; else FILE:ROW)")
    parser.add_argument("--encoder", help="hf:ORG/NAME, a local HF folder, open_clip:ARCH/TAG, llm2clip:...")
    parser.add_argument("--out", required=True, help="output folder; stores go to OUT/image and OUT/text")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--shard_size", type=int, default=200_000)
    parser.add_argument("--num_workers", type=int, default=min(16, max(1, (os.cpu_count() or 2) - 1)),
                        help="processes decoding images while this one encodes (0: decode inline)")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="skip (and list) images with more pixels, decoded or once resized to the encoder's input on "
                        "the short side, read from the header before decoding (0: no cap)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="let a Hugging Face encoder folder run the Python it ships (its config's auto_map)")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on CUDA), float32, bfloat16, float16")
    parser.add_argument("--store_dtype", default="float16", choices=["float16", "float32"], help="dtype of stored embeddings")
    parser.add_argument("--max_items", type=int, help="embed at most this many images and this many texts (streams: per rank)")
    parser.add_argument("--num_shards", type=int, default=1, help="split the inputs over this many jobs (array jobs); "
                        "combines with torchrun/SLURM ranks")
    parser.add_argument("--shard_index", type=int, default=0, help="this job's index in [0, --num_shards)")
    parser.add_argument("--merge", action="store_true", help="only merge the parts that ranks wrote into OUT/image and "
                        "OUT/text (done automatically by the last rank to finish)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store made with another encoder/dim")
    return parser


def _inputs(args: argparse.Namespace, rank: Rank) -> dict[str, Inputs]:
    """This rank's inputs per kind; lists are checked (unique ids, not empty) before any model is loaded."""
    options = {k: getattr(args, k) for k in ("image_root", "image_column", "text_column", "id_column")}
    data = read_data_json(args.data_json, args.image_root) if args.data_json else ([], [])
    listed = {"image": [Unit(args.data_json, items=[Sample(i.id, i.path, i.source) for i in data[0]])] if data[0] else [],
              "text": [Unit(args.data_json, items=[Sample(t.id, t.text, t.text) for t in data[1]])] if data[1] else []}
    inputs = {}
    for kind, spec in (("image", args.images), ("text", args.texts)):
        if spec is None and not listed[kind]:
            continue
        found = open_inputs([spec] if spec else [], kind, rank.part, rank.parts, options, args.input_format,
                            args.max_items, listed[kind])
        items = [s for u in found.units if u.items is not None for s in u.items]
        check_unique_ids([s.id for s in items], f"{kind}s")  # before any model is loaded or row encoded
        if rank.parts == 1 and not found.units:
            raise InputError(f"--{kind}s {spec or args.data_json}: no inputs (an empty folder or file)")
        inputs[kind] = found
    return inputs


def run(args: argparse.Namespace) -> dict:
    """Embed (or, with --merge, only merge the ranks' parts) as the flags say; returns the summary to print."""
    out = Path(args.out)
    if args.merge:
        stores = [out / kind for kind in ("image", "text") if any((out / kind).glob(PART_GLOB))]
        if not stores:
            raise InputError(f"--merge: no store under {out} holds rank parts")
        return {"merged": {store.name: merge_parts(store) for store in stores}}
    if not (args.images or args.texts or args.data_json):
        raise InputError("nothing to embed: give --images, --texts and/or --data_json")
    if not args.encoder:
        raise InputError("--encoder is required (except with --merge)")
    rank = detect_rank(args.num_shards, args.shard_index)
    inputs = _inputs(args, rank)
    device = args.device
    if device == "auto" and torch.cuda.is_available() and rank.parts > 1:
        device = f"cuda:{rank.local_rank % torch.cuda.device_count()}"
    encoder = load_encoder(args.encoder, device, args.dtype, args.batch_size, args.trust_remote_code)
    # Open both stores first, so a store made with another encoder (or being written) is refused before encoding.
    writers: dict[str, StoreWriter] = {}
    try:
        for kind, found in inputs.items():
            writers[kind] = StoreWriter(out / kind, kind, encoder.name, encoder.dim, args.store_dtype, args.shard_size,
                                        args.overwrite, part=rank.partial, inputs=found.fingerprint)
        summary: dict[str, Any] = {"encoder": encoder.name, "dim": encoder.dim, "rank": rank}
        if "image" in writers:
            summary["image"] = embed_images(inputs["image"], encoder, writers["image"], args.batch_size,
                                            args.num_workers, args.max_pixels)
        if "text" in writers:
            summary["text"] = embed_texts(inputs["text"], encoder, writers["text"], args.batch_size)
    finally:
        for writer in writers.values():
            writer.shutdown()
    if rank.parts > 1:
        summary["merged"] = {kind: merge_if_last(out / kind) for kind in writers}
    for kind in writers:
        merged = summary.get("merged", {}).get(kind)
        stored = merged["count"] if merged else summary[kind]["stored"] if rank.parts == 1 else None
        if stored == 0:
            raise InputError(f"{out / kind}: nothing stored: {summary[kind]['inputs']} inputs, all skipped "
                             f"(see {out / kind / SKIPPED})" if summary[kind]["inputs"] else f"{out / kind}: no inputs")
    return summary


def format_summary(summary: dict) -> str:
    """The summary as the lines image_embed.py prints."""
    if "encoder" not in summary:
        return "\n".join(f"{kind:5s}: merged {m['parts']} parts, {m['count']} in store, {m['skipped']} skipped"
                         for kind, m in summary["merged"].items())
    rank = summary["rank"]
    lines = [f"encoder {summary['encoder']} (dim {summary['dim']})"
             + (f", part {rank.part} of {rank.parts} ({rank.launcher})" if rank.parts > 1 else "")]
    for kind in ("image", "text"):
        if kind in summary:
            s = summary[kind]
            lines.append(
                f"{kind:5s}: {s['inputs']} inputs, {s['encoded']} encoded, {s['resumed']} done before (resumed), "
                f"{s['skipped']} skipped, {s['stored']} in store{' part' if rank.parts > 1 else ''}, "
                f"{s['items_per_s']} items/s"
            )
            merged = summary.get("merged", {}).get(kind)
            if rank.parts > 1:
                lines.append(f"       merged: {merged['count']} in store from {merged['parts']} parts" if merged else
                             "       not merged yet: another rank is still running or merging (the last to finish merges)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (InputError, StoreError, OSError, ImportError, ValueError, DecodeError) as e:  # OSError: a model or file that cannot be read
        return report(e)
    print(format_summary(summary))
    return 0

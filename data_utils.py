"""Check a data file against an embedding folder before training, and build its memory-mapped cache.

    python data_utils.py --data_path train.json [--embed_folder STORE] [--version plain] [--num_visual_tokens 576]
Prints how many samples resolve and how many rows of the store are unusable (NaN / Inf / all zero), and
fails (one line, exit 2) naming the first sample with no embedding (unless --skip_missing) or an unusable
one (unless --skip_bad_embeddings), or a bad data file. The training code lives in revision/data.py;
train.py reads `folder_path` from here.
"""

folder_path = ''  # the default embedding folder (a store written by image_embed.py / embed_mean.py); --embed_folder overrides it

import argparse

from transformers import AutoTokenizer

from revision.data import EmbeddingTable, InputError, SupervisedDataset, exit_with
from revision.store import StoreError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--embed_folder", default=folder_path)
    parser.add_argument("--model_name_or_path", required=True, help="for the tokenizer")
    parser.add_argument("--version", default="plain")
    parser.add_argument("--num_visual_tokens", type=int, default=576)
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument("--embed_cache_dir", default=None)
    parser.add_argument("--skip_missing", action="store_true")
    parser.add_argument("--skip_bad_embeddings", action="store_true")
    args = parser.parse_args()
    if not args.embed_folder:
        parser.error("no embedding folder: pass --embed_folder or set folder_path at the top of data_utils.py")
    try:
        table = EmbeddingTable(args.embed_folder, args.embed_cache_dir)
        bad = len(table.unusable_rows)
        print(f"table {table.root}: {len(table)} x {table.dim} {table.kind} embeddings, encoder {table.encoder}; "
              f"{bad} unusable rows (NaN / Inf / all zero)" + (f", e.g. {table.describe(int(table.unusable_rows[0]))}" if bad else ""))
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        dataset = SupervisedDataset(args.data_path, tokenizer, table, args.version, args.num_visual_tokens,
                                    args.model_max_length, skip_missing=args.skip_missing,
                                    skip_bad_embeddings=args.skip_bad_embeddings)
    except (InputError, StoreError, OSError) as e:
        exit_with(e)
    with_image = int((dataset.rows >= 0).sum())
    print(f"{args.data_path}: {len(dataset)} samples ({with_image} with an embedding; skipped: {dataset.skipped} with no "
          f"embedding, {dataset.skipped_bad} with an unusable one, {dataset.skipped_empty} with no assistant turn)")


if __name__ == "__main__":
    main()

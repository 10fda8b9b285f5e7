"""Check a data file against an embedding folder before training, and build its memory-mapped cache.

    python data_utils.py --data_path train.json --model_name_or_path LLM [--embed_folder STORE] [--version V] [--num_visual_tokens N]
Prints how many samples resolve and how many rows of the store are unusable (NaN / Inf / all zero), and
fails (one line, exit 2) naming the first sample with no embedding (unless --skip_missing) or an unusable
one (unless --skip_bad_embeddings), or a bad data file. Its flags are train.py's (revision/arguments.py),
their defaults revision/defaults.py's. The training code lives in revision/data.py; train.py reads `folder_path`
from here.
"""

folder_path = ''  # the default embedding folder (a store written by image_embed.py / embed_mean.py); --embed_folder overrides it

import argparse

from transformers import AutoTokenizer

from revision.arguments import DataArguments, ModelArguments, TrainingArguments, add_flags
from revision.data import EmbeddingTable, SupervisedDataset, check_lengths
from revision.defaults import NUM_VISUAL_TOKENS
from revision.errors import InputError, StoreError, exit_with


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags that a check needs, as train.py spells them (no checkpoint to inherit from: visual tokens
    default to revision/defaults.py's)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flags(parser, DataArguments, ["data_path", "embed_folder"], required=["data_path"], defaults={"embed_folder": folder_path})
    add_flags(parser, ModelArguments, ["model_name_or_path", "version", "num_visual_tokens"], required=["model_name_or_path"],
              defaults={"num_visual_tokens": NUM_VISUAL_TOKENS})
    add_flags(parser, TrainingArguments, ["model_max_length"])
    add_flags(parser, DataArguments, ["embed_cache_dir", "skip_missing", "skip_bad_embeddings"])
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if not args.embed_folder:
        parser.error("no embedding folder: pass --embed_folder or set folder_path at the top of data_utils.py")
    try:
        check_lengths(args.model_max_length, args.num_visual_tokens)
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

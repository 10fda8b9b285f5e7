"""Turn text embeddings into synthetic image embeddings without training (docs/design.md "Alignment").

    python embed_mean.py --text emb/text --image emb/image --out emb/text_realign            # ReAlign (default)
    python embed_mean.py --text emb/text --image emb/image --out emb/text_ms --method mean_shift
    # methods: none, mean_shift, c3 (its noise is applied in stage 1), anchor, anchor_trace (the paper's ablation), realign
    python embed_mean.py --text new/text --out new/text_realign --apply_stats emb/text_realign/align_stats.json
    torchrun --nproc_per_node 8 embed_mean.py --text new/text --out new/text_realign --apply_stats ...  # or SLURM,
    python embed_mean.py ... --apply_stats ... --num_shards 32 --shard_index $SLURM_ARRAY_TASK_ID         # array jobs

Writes to --out: the aligned text store (same ids and captions, float32 by default), align_stats.json
(the fitted statistics; finetuning and inference apply its image_map to real images), and
gap_report.json + gap_report.png (the modality gap before and after; --no_report skips them).
Both shard layouts are read: our stores (manifest.json) and folders of reference-layout *.pkl.
With --apply_stats, ranks/parts each map a contiguous range of the text shards; the last to finish (or --merge)
writes the manifest. Fitting runs in one process (docs/distributed.md "Applying an alignment over parts").
"""
import argparse
import json
import os

# The passes are memory-bound matrix-vector products: extra BLAS threads only spin against the main one.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Transparent huge pages make the kernel compact memory while it faults in a large array: measured 0.1-0.7 s per
# 512 MB, varying from run to run; small pages cost a steady 0.2 s. (numpy reads this when it is imported.)
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

from revision.align import DEFAULT_MEMORY_BUDGET, align_stores, method_names  # noqa: E402
from revision.align.run import merge_aligned  # noqa: E402
from revision.distributed import detect_rank  # noqa: E402
from revision.errors import StoreError, exit_with  # noqa: E402
from revision.locks import LockedError  # noqa: E402
from revision.nofollow import LinkError  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", help="text embedding store (folder); required except with --merge")
    p.add_argument("--image", help="image embedding store (folder); not needed with --apply_stats")
    p.add_argument("--out", required=True, help="folder for the aligned text store (must differ from the inputs)")
    p.add_argument("--method", choices=method_names(), default="realign",
                   help="the registered alignment methods (revision/align/methods.py)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="dtype of the written embeddings")
    p.add_argument("--stats_sample", type=int, default=None, help="fit on a uniform sample of N rows per side")
    p.add_argument("--apply_stats", help="reuse statistics from an earlier run (align_stats.json or its folder)")
    p.add_argument("--drop_bad", action="store_true", help="skip (and count) NaN/Inf/all-zero rows instead of failing")
    p.add_argument("--force", action="store_true", help="allow text and image stores from different encoders")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store in --out")
    p.add_argument("--no_report", action="store_true", help="skip gap_report.json/.png")
    p.add_argument("--report_sample", type=int, default=10_000, help="rows per side sampled for the gap report")
    p.add_argument("--shard_size", type=int, default=16_384,
                   help="rows per written shard (the writer holds two: 2 x 16k x 1280 float32 = 168 MB)")
    p.add_argument("--memory_budget_gb", type=float, default=DEFAULT_MEMORY_BUDGET / 2**30,
                   help="GiB of decoded text embeddings kept in RAM between passes; the rest is cached on disk in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_verify", action="store_true", help="read the stores without checking shard sha256s (~2x faster)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--num_shards", type=int, default=1, help="with --apply_stats: split the text shards over this many "
                   "jobs (array jobs); combines with torchrun/SLURM ranks")
    p.add_argument("--shard_index", type=int, default=0, help="this job's index in [0, --num_shards)")
    p.add_argument("--merge", action="store_true", help="only merge the parts written into --out (done automatically "
                   "by the last part to finish)")
    args = p.parse_args(argv)
    if not args.merge and not args.text:
        p.error("--text is required (except with --merge)")
    try:
        if args.merge:
            print(json.dumps(merge_aligned(args.out), indent=1))
            return
        rank = detect_rank(args.num_shards, args.shard_index)
        summary = align_stores(
            args.text, args.image, args.out, method=args.method, dtype=args.dtype, stats_sample=args.stats_sample,
            apply_stats=args.apply_stats, drop_bad=args.drop_bad, force=args.force, overwrite=args.overwrite,
            report=not args.no_report, report_sample=args.report_sample, seed=args.seed, shard_size=args.shard_size,
            progress=not args.quiet, memory_budget=int(args.memory_budget_gb * 2**30), verify=not args.no_verify,
            part=rank.partial,
        )
    except (StoreError, ValueError, LockedError, LinkError) as e:  # bad input: one clear line, no traceback
        exit_with(e, prog="embed_mean.py")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

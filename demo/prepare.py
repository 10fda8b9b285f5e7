"""The launchers' embedded default: the toy world with everything a training stage reads, built once.

    python -m demo.prepare --out outputs/toy-world [--preset default|mini] [--seed 0]
    python -m demo.prepare --print_sizes    # the launchers: visual tokens and max length (1 129)

Into OUT: world/ (scenes, captions, instruction data), clip/ (the toy CLIP), llm/ (the toy LLM),
embeds/unpaired/{image,text} (the stores) and align/realign (the ReAligned caption store and its
align_stats.json). script/train/*.sh call this when MODEL is unset. It runs the world's own steps,
image_embed.py and embed_mean.py, and never a launcher: the whole pipeline (demo.pipeline) calls
the launchers, so the launchers do not call it. A finished step is not run again.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from demo import add_config_arguments, config_from_arguments
from demo.budget import BUDGETS, Budget
from demo.pipeline import prepare
from demo.runner import Runner, repository_root
from revision.errors import InputError, exit_with


def prepare_default_world(out: Path, budget: Budget, seed: int = 0, repo: str | Path | None = None) -> dict[str, Path]:
    """World, toy CLIP, toy LLM, the unpaired stores and the realign text store, directly in `out`; their paths.
    `repo`: the checkout whose image_embed.py and embed_mean.py run (default: the current directory)."""
    return prepare(Runner(out, seed, budget, repo), seed, budget, ("realign",), paired_store=False, eval_store=False)


def launch_sizes(budget: Budget = Budget()) -> tuple[int, int]:
    """(visual tokens, model_max_length) the launchers train this world with: the toy's base budget, its length
    rule as the pipeline's (captions of max_length tokens beside the visual block)."""
    return budget.visual_tokens, budget.max_length + budget.visual_tokens


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/toy-world")
    parser.add_argument("--preset", choices=sorted(BUDGETS), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repo", default=None,
                        help="the ReVision checkout whose scripts the steps run (default: the current directory)")
    parser.add_argument("--print_sizes", action="store_true",
                        help="print the launchers' visual tokens and max length for this world, and build nothing")
    add_config_arguments(parser, Budget(), overrides_only=True, skip=("world",))  # the world is the preset's
    args = parser.parse_args(argv)
    if args.print_sizes:
        print(*launch_sizes())
        return
    try:
        repo = repository_root(args.repo)
    except InputError as e:
        exit_with(e, prog=parser.prog)
    budget = config_from_arguments(args, BUDGETS[args.preset])
    torch.set_num_threads(budget.threads)  # the in-process steps (toy CLIP, toy LLM)
    paths = prepare_default_world(Path(args.out).resolve(), budget, args.seed, repo)
    print("\n".join(f"{k} {v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()

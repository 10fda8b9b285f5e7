"""Stage-2 data for binding: every conditional colour or shape question about the two-object scenes of more unpaired
images of a finished run's world, embedded with the run's encoder.

    python -m demo.binding --run OUT/seed-0 --images 4000

writes RUN/binding-N/ (demo.world.write_binding: the world's unpaired-image stream drawn on to N images, its own the
first; binding.json, one question a conversation; emb/image, the store). The world's own conversations ask about 600
such questions; the stand-in reader binds from every question of 2000-4000 images after 10-60 passes
(docs/results.md, "Binding is slow to learn"): data for a GPU-sized stage 2 (a row's script/train/finetune_full.sh command, the
first line of RUN/logs/ROW.stage2.log, with DATA=RUN/binding-N/binding.json EMBED_FOLDER=RUN/binding-N/emb/image) and
for `demo.reader --world RUN/binding-N`.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from demo.heldout import drawn_further
from demo.world import write_binding
from revision.errors import InputError, exit_with


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a seed folder of demo.pipeline (OUT/seed-N)")
    parser.add_argument("--images", type=int, default=4000, help="unpaired images in all, the world's own first")
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    try:
        folder = drawn_further(run_dir, f"binding-{args.images}", lambda world, out: write_binding(world, args.images, out),
                               "unpaired_images.jsonl")
    except (InputError, ValueError, OSError) as e:
        exit_with(e, prog=parser.prog)
    counts = json.loads((folder / "world.json").read_text())["counts"]
    print(f"{counts['binding_questions']} binding questions on {counts['unpaired_images']} images in {folder}:\n"
          f"  stage 2: a row's command (first line of {run_dir / 'logs' / 'ROW.stage2.log'}) with "
          f"DATA={folder / 'binding.json'} EMBED_FOLDER={folder / 'emb' / 'image'}\n"
          f"  reader:  python -m demo.reader --world {folder} --train {folder / 'emb' / 'image'} "
          f"--eval {run_dir / 'embeds' / 'eval' / 'image'}")


if __name__ == "__main__":
    main()

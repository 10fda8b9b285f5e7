#!/usr/bin/env bash
# The main job, end to end on CPU (`make demo`), on real pretrained parts: build the toy world, train its CLIP
# (a dual encoder: the real all-MiniLM-L6-v2 frozen as the text tower, a small vision tower trained against it),
# convert the real SmolLM2-135M-Instruct once (revision/gguf.py), then run the real scripts along the headline
# path (image_embed.py, embed_mean.py, script/train/pretrain.sh on ReAligned text, finetune_full.sh on real image
# embeddings, revision.predict on held-out images) and print held-out questions with the model's answers and the truth.
#   bash script/demo.sh                              the realign row, one seed -> outputs/demo/results.md
#   bash script/demo.sh --rows none,mean_shift,c3,anchor,anchor_trace,realign,paired,no_stage1 --seeds 0,1,2
#                                                    the comparison table on the real parts (~45 min a seed on 2 cores)
#   bash script/demo.sh --preset toyllm --rows ...   the same world and encoder with the toy LLM (~10 min a seed)
#   bash script/demo.sh --preset toy --rows ...      the all-toy parts (toy CLIP, toy LLM: docs/results.md's history)
#   bash script/demo.sh --preset mini                a miniature run (seconds; numbers meaningless)
# Any demo.pipeline flag passes through (--rows, --ablation_visual_tokens, --stage1_epochs, ...).
# OUT (default outputs/demo) holds everything; rerunning resumes after the last finished stage.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PY" -m demo.pipeline --out "${OUT:-outputs/demo}" --rows realign "$@"

#!/usr/bin/env bash
# The main job, end to end on CPU (`make demo`): build the toy world, train the toy CLIP and toy LLM, run the
# real scripts (image_embed.py, embed_mean.py per method, script/train/pretrain.sh, finetune_full.sh,
# revision.predict on held-out real images) and print + write the table comparing the alignment methods.
#   bash script/demo.sh                              one seed, ~10 min on 2 cores -> outputs/toy-demo/results.md
#   bash script/demo.sh --seeds 0,1,2                mean ± std over three seeds
#   bash script/demo.sh --preset mini                a miniature run (seconds; numbers meaningless)
# Any revision.toy.pipeline flag passes through (--rows, --ablation_visual_tokens, --stage1_epochs, ...).
# OUT (default outputs/toy-demo) holds everything; rerunning resumes after the last finished stage.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PY" -m revision.toy.pipeline --out "${OUT:-outputs/toy-demo}" "$@"

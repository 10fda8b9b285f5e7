#!/usr/bin/env bash
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"  # `sh script/train/X.sh` works too (the README form)
# Stage 1: train the projector on captions keyed into the ALIGNED TEXT store (LLM frozen, template plain).
# Variables (all optional): MODEL DATA EMBED_FOLDER ALIGN_STATS OUTPUT GPUS NODES HOSTFILE DEEPSPEED LR BATCH
#   GLOBAL_BATCH EPOCHS MAX_LENGTH VISUAL_TOKENS PROJECTOR EXTRA PRESET DRY_RUN. Defaults: the official
#   ReVision stage 1 (8 per device, global 256, lr 5e-4, ZeRO-2). Unset MODEL: the embedded toy world
#   (TOY_PRESET=mini: a miniature one). Resume: EXTRA="--resume_from_checkpoint latest".
source "$(dirname "$0")/launch.sh"
BATCH=${BATCH:-8}
[ -z "${MODEL:-}" ] && default_world text pretrain
: "${DATA:?set DATA to the pretraining JSON}"
OUTPUT=${OUTPUT:-outputs/revision-pretrain}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
DEEPSPEED=${DEEPSPEED:-script/deepspeed/zero2.json}
# ALIGN_STATS (optional): recorded in the checkpoint, so captioning a real image applies the same image_map
align=(); [ -n "${ALIGN_STATS:-}" ] && align=(--align_stats "$ALIGN_STATS")
launch --tune_mm_mlp_adapter --version "$DEFAULT_TEMPLATE" --num_visual_tokens "${VISUAL_TOKENS:-$DEFAULT_VISUAL_TOKENS}" \
  --mm_projector_type "${PROJECTOR:-$DEFAULT_PROJECTOR}" --learning_rate "${LR:-5e-4}" "${align[@]}"

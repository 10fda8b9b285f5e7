#!/usr/bin/env bash
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"  # `sh script/train/X.sh` works too (the README form)
# Stage 2: projector + whole LLM on instruction data keyed into the IMAGE store; image embeddings pass
# through the alignment's image_map (ALIGN_STATS: embed_mean.py's statistics).
# Variables (all optional): MODEL DATA EMBED_FOLDER ALIGN_STATS PRETRAIN_ADAPTER (stage-1 output or its
#   projector.safetensors) OUTPUT GPUS NODES HOSTFILE DEEPSPEED LR BATCH GLOBAL_BATCH EPOCHS MAX_LENGTH
#   VISUAL_TOKENS PROJECTOR VERSION EXTRA PRESET DRY_RUN. Defaults: the official ReVision stage 2 (16 per device,
#   global 256, lr 1e-5, ZeRO-2). Unset MODEL: the embedded toy world (after pretrain.sh's default run if any).
source "$(dirname "$0")/launch.sh"
BATCH=${BATCH:-16}
[ -z "${MODEL:-}" ] && default_world image "finetune${LORA:+-lora}"
: "${DATA:?set DATA to the instruction JSON}"
OUTPUT=${OUTPUT:-outputs/revision-finetune${LORA:+-lora}}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
DEEPSPEED=${DEEPSPEED:-script/deepspeed/zero2.json}
flags=(--version "${VERSION:-$DEFAULT_INSTRUCT_TEMPLATE}" --learning_rate "${LR:-1e-5}")
[ -n "${PRETRAIN_ADAPTER:-}" ] && flags+=(--pretrain_mm_mlp_adapter "$PRETRAIN_ADAPTER")
# Visual tokens, projector and alignment come from the stage-1 folder (its revision_config.json); a flag
# only when the user sets one (train.py stops when it contradicts stage 1)
[ -n "${VISUAL_TOKENS:-}" ] && flags+=(--num_visual_tokens "$VISUAL_TOKENS")
[ -n "${PROJECTOR:-}" ] && flags+=(--mm_projector_type "$PROJECTOR")
[ -n "${ALIGN_STATS:-}" ] && flags+=(--align_stats "$ALIGN_STATS")
[ -n "${LORA:-}" ] && flags+=(--lora_enable --lora_r "${LORA_R:-128}" --lora_alpha "${LORA_ALPHA:-256}" --mm_projector_lr "${PROJECTOR_LR:-2e-5}")
launch "${flags[@]}"

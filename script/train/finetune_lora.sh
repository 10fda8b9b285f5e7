#!/usr/bin/env bash
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"  # `sh script/train/X.sh` works too (the README form)
# Stage 2 with LoRA: projector + LoRA adapters (LLM frozen). Same variables as finetune_full.sh, plus
# LORA_R (128), LORA_ALPHA (256), PROJECTOR_LR (2e-5); LR defaults to 2e-4: LLaVA-1.5's LoRA recipe (the
# official ReVision has no LoRA script).
LORA=1 LR=${LR:-2e-4} exec bash "$(dirname "$0")/finetune_full.sh"

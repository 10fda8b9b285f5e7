# Shared by pretrain.sh, finetune_full.sh and finetune_lora.sh (sourced, not run).
# Picks the launcher: `deepspeed` over GPUS x NODES (HOSTFILE for several nodes) when GPUs are there,
# else one process on CPU. With MODEL unset, builds the embedded default (the toy world, demo/).
# Defaults are the official ReVision scripts' (README "Training" lists each one and its source).
# PRESET=paper: the paper's whole configuration (Llama-3-8B-Instruct, 576 visual tokens, tf32).
# DRY_RUN=1: print the command as a JSON list of its arguments instead of running it (nothing is built).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
GPUS=${GPUS:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
NODES=${NODES:-1}
HOSTFILE=${HOSTFILE:-}
PRESET=${PRESET:-}
DRY_RUN=${DRY_RUN:-}
case "$PRESET" in
  "") ;;
  paper) MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct} ;;
  *) echo "unknown PRESET=$PRESET (known: paper)" >&2; exit 2 ;;
esac
# train.py's defaults, written once in revision/defaults.py (DEFAULT_VISUAL_TOKENS, DEFAULT_MAX_LENGTH, ...);
# read as a file: nothing of the package (or torch) is imported
defaults=$("$PY" revision/defaults.py) || { echo "could not read revision/defaults.py with $PY" >&2; exit 2; }
eval "$defaults"
USER_MAX_LENGTH=${MAX_LENGTH:-}  # the embedded default keeps the toy's own length unless the caller sets one
MAX_LENGTH=${MAX_LENGTH:-$DEFAULT_MAX_LENGTH}
EPOCHS=${EPOCHS:-1}
EXTRA=${EXTRA:-}               # any further train.py flags, quoted as in a shell: EXTRA='--run_name "my run"'

# default_world KIND RUN: the embedded toy world (demo/: world, toy CLIP, toy LLM, embeddings, ReAlign),
# built once under DEFAULT_DIR (TOY_PRESET=mini: a miniature one in seconds). KIND text: pretraining on the
# ReAligned caption store; image: instruction data on the real image store. The run's output: DEFAULT_DIR/RUN
default_world() {
  DEFAULT_DIR=${DEFAULT_DIR:-outputs/toy-world}
  echo "MODEL not set: training on the embedded toy world (${TOY_PRESET:-default} preset, built once in $DEFAULT_DIR)" >&2
  # demo.prepare builds the world and its stores and never calls a launcher (the full pipeline does)
  [ -n "$DRY_RUN" ] || "$PY" -m demo.prepare --out "$DEFAULT_DIR" --preset "${TOY_PRESET:-default}" >&2
  MODEL=$DEFAULT_DIR/llm
  # the toy's sizes (1 visual token, short captions), from its own budget (demo/prepare.py --print_sizes)
  local sizes toy_tokens toy_length
  sizes=$("$PY" -m demo.prepare --print_sizes) || exit 2
  read -r toy_tokens toy_length <<< "$sizes"
  if [ "$1" = text ]; then
    DATA=${DATA:-$DEFAULT_DIR/world/pretrain.json}
    EMBED_FOLDER=${EMBED_FOLDER:-$DEFAULT_DIR/align/realign}
    ALIGN_STATS=${ALIGN_STATS:-$DEFAULT_DIR/align/realign/align_stats.json}
    VISUAL_TOKENS=${VISUAL_TOKENS:-$toy_tokens}
  else
    DATA=${DATA:-$DEFAULT_DIR/world/instruct.json}
    EMBED_FOLDER=${EMBED_FOLDER:-$DEFAULT_DIR/embeds/unpaired/image}
    if [ -f "$DEFAULT_DIR/pretrain/projector.safetensors" ]; then
      PRETRAIN_ADAPTER=${PRETRAIN_ADAPTER:-$DEFAULT_DIR/pretrain}  # stage 2 inherits its tokens and alignment
    else
      ALIGN_STATS=${ALIGN_STATS:-$DEFAULT_DIR/align/realign/align_stats.json}
      VISUAL_TOKENS=${VISUAL_TOKENS:-$toy_tokens}
    fi
  fi
  OUTPUT=${OUTPUT:-$DEFAULT_DIR/$2}
  MAX_LENGTH=${USER_MAX_LENGTH:-$toy_length}
  GLOBAL_BATCH=${GLOBAL_BATCH:-$BATCH}   # a small corpus: one device batch per step
}

# paper_checks: PRESET=paper is a multi-GPU configuration; say so when the machine or the store disagree
paper_checks() {
  if (( GPUS == 0 )) && [ -z "$DRY_RUN" ]; then
    echo "PRESET=paper trains an 8B LLM with DeepSpeed: no GPU found (set GPUS, or drop PRESET on CPU)" >&2; exit 2
  fi
  local manifest=${EMBED_FOLDER:-}/manifest.json
  if [ -f "$manifest" ] && ! grep -qi 'llm2clip' "$manifest"; then
    echo "warning: PRESET=paper, but $EMBED_FOLDER was not encoded with LLM2CLIP (the paper's encoder; docs/recipe.md)" >&2
  fi
}

# launch FLAGS...: run train.py on every device with gradient accumulation to reach GLOBAL_BATCH
launch() {
  local world=$(( GPUS > 0 ? GPUS * NODES : 1 ))
  local accum=$(( GLOBAL_BATCH / (BATCH * world) )); (( accum < 1 )) && accum=1
  if (( accum * BATCH * world != GLOBAL_BATCH )); then
    echo "warning: global batch is $(( accum * BATCH * world )) ($BATCH per device x $world x $accum), not GLOBAL_BATCH=$GLOBAL_BATCH" >&2
  fi
  local common=(--model_name_or_path "$MODEL" --data_path "$DATA" --output_dir "$OUTPUT"
    --model_max_length "$MAX_LENGTH" --num_train_epochs "$EPOCHS"
    --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$accum"
    --lr_scheduler_type cosine --warmup_ratio 0.03 --weight_decay 0. --save_strategy steps --save_steps 500
    --save_total_limit 2 --logging_steps 1 --report_to none)
  [ -n "${EMBED_FOLDER:-}" ] && common+=(--embed_folder "$EMBED_FOLDER")
  if [ "$PRESET" = paper ]; then
    paper_checks
    common+=(--tf32 true)  # as the official runs (transformers turns tf32 on only under torch.compile)
  fi
  # EXTRA split as a shell would (quotes kept together) but never evaluated: shlex.quote'd words, then eval
  local words extra=()
  words=$("$PY" -c 'import shlex, sys
try: print(" ".join(map(shlex.quote, shlex.split(sys.argv[1]))))
except ValueError as e: sys.exit(f"EXTRA={sys.argv[1]!r} is not a shell word list: {e}")' "$EXTRA") || exit 2
  eval "extra=($words)"
  local cmd
  if (( GPUS > 0 )); then
    local where=(--num_gpus "$GPUS"); [ -n "$HOSTFILE" ] && where=(--hostfile "$HOSTFILE" --num_nodes "$NODES")
    cmd=(deepspeed "${where[@]}" train.py --deepspeed "$DEEPSPEED" --bf16 true --activation_checkpointing true
      --dataloader_num_workers 4 "${common[@]}" "$@" "${extra[@]}")
  else
    cmd=("$PY" train.py "${common[@]}" "$@" "${extra[@]}")
  fi
  if [ -n "$DRY_RUN" ]; then
    "$PY" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${cmd[@]}"
    return
  fi
  echo "+ $(printf '%q ' "${cmd[@]}")" >&2
  "${cmd[@]}"
}

#!/usr/bin/env bash
# GPT-2 small (124M parameters, built from a config; byte-level BPE trained on gensim's Lee corpus) on a CUDA
# GPU, through the causal-LM recipe: AdamW, mL-BFGS and K-BFGS under bf16 autocast; K-BFGS with a curvature
# refresh every 10 steps and bf16 factor products; then the fp16 path (the Trainer's real CUDA GradScaler).
#
#     OUT_DIR=model_cards/causal-lm-gpt2-small-gpu bash scripts/gpt2_small_gpu.sh
#
# TRAIN_FILE=path/to/lee_background.cor uses a copy of the corpus where gensim is not installed.
# About 8 minutes of GPU time on an H100 (mL-BFGS's lr is swept: the recipe default 3e-4 diverges here). Not part of CI (CI has no GPU).
set -euo pipefail
OUT_DIR=${OUT_DIR:-model_cards/causal-lm-gpt2-small-gpu}
STEPS=${STEPS:-300}
DATA=()
if [ -n "${TRAIN_FILE:-}" ]; then DATA=(--train_file "$TRAIN_FILE"); fi
COMMON=("${DATA[@]}" --vocab_size 50257 --n_embd 768 --n_layer 12 --n_head 12 --n_positions 1024
        --block_size 512 --per_device_train_batch_size 8 --warmup_steps 30 --eval_strategy steps
        --eval_steps 50 --logging_steps 10 --save_strategy no --report_to none --seed 0)
run() { python scripts/causal_lm.py "${COMMON[@]}" "$@"; }

run --bf16 --max_steps "$STEPS" --optimizers adamw mlbfgs kbfgs --lr_sweep mlbfgs=3e-5,1e-4,3e-4 \
    --output_dir "$OUT_DIR/bf16" --card_title "GPT-2 small (124M) on the Lee corpus, bf16, GPU"
run --bf16 --max_steps "$STEPS" --optimizers kbfgs --qn_args "update_interval=10,matmul_dtype=bfloat16" \
    --output_dir "$OUT_DIR/bf16-kbfgs-interval10" --card_title "GPT-2 small, K-BFGS every 10 steps, bf16, GPU"
run --fp16 --max_steps "$STEPS" --optimizers adamw mlbfgs kbfgs --output_dir "$OUT_DIR/fp16" \
    --card_title "GPT-2 small (124M) on the Lee corpus, fp16 with GradScaler, GPU"

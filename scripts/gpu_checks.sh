#!/usr/bin/env bash
# hf_qn's GPU checks in one command, sized for a short GPU loan (about 6 minutes on an H200: the tests 0:40, the
# benchmark 4:00 at the budgets below, the profile about 1:30):
#   1. tests/test_cuda.py: the optimizers on CUDA against the CPU, exact resume, the real GradScaler, half-precision
#      Grams with a float32 result, the damped inverses against the CPU's, the LM benchmark's GPU path;
#   2. GPT-2 small (12 x 768, 124M parameters at the 50257 vocabulary) on the Wikipedia excerpt: AdamW, Muon and
#      K-BFGS's defaults, lr swept, taking turns in one process (scripts/benchmark_lm.py): validation loss against
#      seconds and steps, step ratios, optimizer state bytes and each optimizer's peak GPU memory. The excerpt is
#      68 steps of 16 x 512 tokens an epoch, so every run overfits within about 10 s: the 30-s budget shows the
#      minimum and the turn, and a longer one adds nothing;
#   3. scripts/profile_step_kinds.py: K-BFGS's curvature and plain steps timed apart and profiled against AdamW's,
#      and the damped inverse timed both ways.
#
#     OUT_DIR=model_cards/lm-gpt2-wikipedia-gpu bash scripts/gpu_checks.sh
#
# Run from the repository root (hf_qn is imported from it). The text comes from gensim's test data; where gensim is
# not installed (a bare GPU image), write the same articles to a file on a machine that has it and pass the file:
#
#     python -c "import sys; sys.path.insert(0, 'scripts'); import benchmark_lm as b; \
#                open('wiki.txt', 'w').write('\n\n'.join(b.load_wikipedia()))"
#     WIKI_TEXT=wiki.txt bash scripts/gpu_checks.sh
#
# (articles have no blank lines inside, so --text_files reads back the same documents and the same split).
# SIZE, VOCAB, BLOCK, BUDGET, SWEEP and EVAL override the benchmark's size, vocabulary, block length, seconds of
# each final run, of each sweep candidate and between evaluations (SIZE=tiny VOCAB=512 BLOCK=64 BUDGET=2 SWEEP=0
# is a CPU dry run; PROFILE=0 skips the profile); PYTHON names the interpreter (default python; python3 on an
# image without a python command).
set -euo pipefail
OUT_DIR=${OUT_DIR:-model_cards/lm-gpt2-wikipedia-gpu}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
TEXT=()
if [ -n "${WIKI_TEXT:-}" ]; then TEXT=(--text_files "$WIKI_TEXT"); fi

"${PYTHON:-python}" -m pytest -q -m cuda tests/test_cuda.py
"${PYTHON:-python}" scripts/benchmark_lm.py "${TEXT[@]}" --size "${SIZE:-gpt2}" --vocab_size "${VOCAB:-50257}" \
    --block_size "${BLOCK:-512}" --batch_size 16 --optimizers adamw muon kbfgs --budget "${BUDGET:-30}" \
    --sweep_seconds "${SWEEP:-6}" --eval_every "${EVAL:-2}" --output_dir "$OUT_DIR"
if [ "${PROFILE:-1}" != 0 ]; then
    "${PYTHON:-python}" scripts/profile_step_kinds.py --optimizers adamw kbfgs --inverses \
        --output_dir "$OUT_DIR/profile"
fi

#!/usr/bin/env bash
# Issue 14 §4 as one prepared command for one NVIDIA GPU: 7B-shape QLoRA (recipes/translate_7b.toml on a
# random-weight Qwen2.5-7B shape, built on the GPU), trmlx's CUDA backend vs the Trainer + peft + bitsandbytes peer:
# tokens/s, MFU (4N), peak, and the plan vs the measured peak (`trmlx bench`), first with liger-kernel's fused
# linear cross-entropy (where LIGER_SITE holds it), then at 2 × 1,024 with trmlx's own chunked loss.
#
#   bash benchmarks/cuda_7b_sweep.sh                      # results into benchmarks/results/cuda-7b/{fused,chunked}
#   OUT=$OUT LIGER_SITE=/tmp/liger SEQ_LENS=1024 BATCHES=1,2,4 bash benchmarks/cuda_7b_sweep.sh
#   SHAPE=tiny bash benchmarks/cuda_7b_sweep.sh           # a CPU: the same pipeline at the tiny shape, NOT a GPU result
#
# Each configuration and side is a fresh process that loads and quantises the whole model (tens of seconds at 7B),
# so the defaults (seq 1,024 × batch 1, 2, 4 and 512 × 2, three steps × two trials) are sized for a 10-minute
# command; SEQ_LENS / BATCHES split a longer sweep across commands. Packing is not measured here: bench's rows are
# synthetic and all seq_len long, so there is nothing to pack (benchmarks/packing.py measures it on skewed data).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SHAPE=${SHAPE:-qwen2.5-7b}
OUT=${OUT:-benchmarks/results/cuda-7b}
SEQ_LENS=${SEQ_LENS:-512,1024}
BATCHES=${BATCHES:-1,2,4}
STEPS=${STEPS:-3}
TRIALS=${TRIALS:-2}
LIGER_SITE=${LIGER_SITE:-}  # a folder holding liger_kernel (pip install --target), put on PYTHONPATH for the fused run

settings=()
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    # paged_adamw_8bit (the recipe's CUDA optimizer) needs a GPU; a CPU check runs plain AdamW
    settings+=(--set "train.optimizer='adamw'")
fi
if [ "$SHAPE" = tiny ]; then
    settings+=(--set peft.layers=0)  # the recipe adapts the last 16 layers; the tiny shape has 2
fi
bench=("$PYTHON" -m trmlx bench recipes/translate_7b.toml --backends cuda --model-shape "$SHAPE" --steps "$STEPS"
       --trials "$TRIALS" --warmup 1 "${settings[@]}")
mkdir -p "$OUT/fused" "$OUT/chunked"
status=0
echo "== fused loss (liger-kernel where installed) and the peer: seq $SEQ_LENS x batch $BATCHES"
PYTHONPATH="${LIGER_SITE:+$LIGER_SITE:}${PYTHONPATH:-}" "${bench[@]}" --seq-len "$SEQ_LENS" --batch-size "$BATCHES" \
    --out "$OUT/fused" || status=$?
echo "== trmlx's chunked loss (no liger-kernel on the path), 2 x 1024, no peer"
"${bench[@]}" --seq-len 1024 --batch-size 2 --no-peers --out "$OUT/chunked" || status=$?
exit "$status"

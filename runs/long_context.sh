#!/usr/bin/env bash
# The long-context stage of runs/tiny_pipeline.sh: continue the pretrained tiny model at seq 1024 (8x its training
# length) with InfLLM v2 sparse attention on, LongRoPE factors from 128 to 2048 positions and length-bucketed
# batches, on KJV text with planted facts (runs/planted_facts.py); then score planted-fact retrieval on held-out
# tests before and after the stage, with the same sparse attention on: ~1000-token prompts (the fact 450+ tokens
# back, past the pretrained length) and ~120-token ones (within it: the copy learnt in pretraining), each with the
# control (the asked number swapped out of the prompt).
#   bash runs/long_context.sh OUT BASE_MODEL_DIR [--set key=value ...]   (writes OUT/long/)
#   LONG_STEPS (120) sets the stage's steps, LONG_TESTS (40) the held-out tests scored, THREADS (2) torch threads.
set -euo pipefail
OUT=$1; BASE=$2; shift 2
PY=${PYTHON:-python}
HERE=$(dirname "$0")
SPARSE='{"dense_len": 512, "block_size": 32, "kernel_size": 16, "kernel_stride": 8, "window_size": 128, "topk": 8}'
STEPS=${LONG_STEPS:-120}
[ -f "$OUT/long/test.jsonl" ] || "$PY" "$HERE/planted_facts.py" data "$OUT" --tokens 1500000
"$PY" -m minicpm4.cli data tokenize "$OUT/long/train.jsonl" --tokenizer "$OUT/tokenizer" -o "$OUT/long/shards"
[ -f "$OUT/long/run/checkpoints/latest" ] && RESUME=--resume || RESUME=
"$PY" -m minicpm4.cli train pretrain $RESUME --set data="$OUT/long/shards" --set model="$BASE" \
  --set out_dir="$OUT/long/run" --set seq_len=1024 --set 'length_buckets=[256,512,1024]' --set longrope_from=128 \
  --set "model_overrides.sparse_config=$SPARSE" --set batch_size=4 --set micro_batch_size=4 --set lr=0.01 \
  --set steps="$STEPS" --set warmup_steps=10 --set decay_steps=$((STEPS / 5)) --set threads="${THREADS:-2}" \
  --set save_every=20 "$@"
LONG="$OUT/long/run/checkpoints/$(printf 'step_%07d' "$STEPS")/model"
for TESTS in test_short.jsonl test.jsonl; do
  "$PY" "$HERE/planted_facts.py" eval "$OUT" "before=$BASE" "after=$LONG" --sparse "$SPARSE" \
    --limit "${LONG_TESTS:-40}" --control --tests "$TESTS" --threads "${THREADS:-2}"
done

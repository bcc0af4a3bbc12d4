#!/usr/bin/env bash
# MCP tool use, measured and improved on the default model (SmolLM2-135M-Instruct), on CPU: generate and check the
# eval cases -> `eval mcp` before -> tool SFT chats by reverse generation (no query or call shared with the eval
# cases) and as many non-tool control chats (KJV verse completion) -> `train sft` on each, same settings and steps
# -> `eval mcp` on both results. Every stage resumes: rerun the same command after an interruption.
#   bash runs/mcp_tool_use.sh [OUT]    PYTHON picks the interpreter, THREADS (1) torch threads, STEPS (20) SFT steps,
#                                      SEQ_LEN (2048) and BATCH (2) the SFT rows and rows per step, ARMS ("tool control")
#                                      the SFT arms, PER_SERVER (25) training cases per server, LIMIT (40; empty: all
#                                      210) eval cases, evenly spaced, MODEL (the default model's directory);
#                                      OUT/times.txt: seconds per stage. About 40 min on 2 shared cores (BENCHMARKS.md).
set -euo pipefail
OUT=${1:-runs/out/mcp_tool_use}
PY=${PYTHON:-python}
THREADS=${THREADS:-1}
STEPS=${STEPS:-20}
LIMIT=${LIMIT-40}
export OMP_NUM_THREADS=$THREADS
MODEL=${MODEL:-$("$PY" -c "from minicpm4.io.loader import default_model_dir; print(default_model_dir())")}
LIMIT_FLAG=${LIMIT:+--limit $LIMIT}
mkdir -p "$OUT"
. "$(dirname "$0")/stage.sh"  # stage NAME CMD...
evaluate() {  # evaluate NAME MODEL_DIR
  "$PY" -m minicpm4.cli eval mcp --model "$2" --dtype bf16 --cases "$OUT/cases.jsonl" $LIMIT_FLAG -o "$OUT/eval_$1" \
    2> "$OUT/eval_$1.log" | tee "$OUT/eval_$1.txt"
}
sft() {  # sft NAME DATA: full fine-tuning of the default model, the same settings for both arms
  local resume=
  [ -f "$OUT/sft_$1/checkpoints/latest" ] && resume=--resume
  "$PY" -m minicpm4.cli train sft $resume --set data="$2" --set model="$MODEL" --set out_dir="$OUT/sft_$1" \
    --set seq_len="${SEQ_LEN:-2048}" --set batch_size="${BATCH:-2}" --set micro_batch_size="${BATCH:-2}" --set steps="$STEPS" --set warmup_steps=2 \
    --set decay_steps=$((STEPS / 4)) --set lr=2e-4 --set mup=false --set weight_decay=0 --set threads="$THREADS" \
    --set save_every=4 2> "$OUT/sft_$1.log"
}
[ -f "$OUT/cases.jsonl" ] || stage cases "$PY" -m minicpm4.cli eval mcp-cases -o "$OUT/cases.jsonl"
stage eval_before evaluate before "$MODEL"
[ -f "$OUT/sft_control.jsonl" ] || stage sft_data "$PY" -m minicpm4.cli eval mcp-sft-data --cases "$OUT/cases.jsonl" \
  --per-server "${PER_SERVER:-25}" -o "$OUT/sft_tool.jsonl" --control "$OUT/sft_control.jsonl"
ARMS=${ARMS:-tool control}
for arm in $ARMS; do
  stage "sft_$arm" sft "$arm" "$OUT/sft_$arm.jsonl"
done
for arm in $ARMS; do
  stage "eval_$arm" evaluate "$arm" "$OUT/sft_$arm/checkpoints/$(cat "$OUT/sft_$arm/checkpoints/latest")/model"
done
echo "before / after tool SFT / after control SFT (overall: function name, argument names, argument values):"
for name in before $ARMS; do
  "$PY" -c "import json,sys; o=json.load(open(sys.argv[1]))['overall']; print(sys.argv[2], o)" "$OUT/eval_$name/report.json" "$name"
done

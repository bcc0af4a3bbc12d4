#!/usr/bin/env bash
# UltraClean on the offline demo corpus: build it, train the classifier, filter, score the result.
#
#   bash runs/data_demo.sh [OUT_DIR]          # default runs/out/data_demo; ~1-2 min on 2 cores
#   SYNTH_URL=http://127.0.0.1:8000/v1 bash runs/data_demo.sh   # also synthesize from 5 kept documents
#
# Steps and what they print:
#   1. demo-corpus: seeds/{pos,neg}.jsonl (half the documents) and a held-out mixed corpus/ (the other half,
#      ~2% exact duplicates, 4 unusable lines). Labels are by construction (clean prose vs boilerplate/damage).
#   2. train-classifier twice on the seeds: the paper's hyperparameters (dim 256, lr 0.1, wordNgrams 3,
#      minCount 5, epoch 3; hash table 200k rows instead of 2M to keep the model at 200 MB), then with
#      --epoch 25, since 3 epochs over ~1k seeds underfit (the paper's seed sets are far larger).
#      Each prints the held-out (10%) precision/recall.
#   3. filter the corpus with each model: a Gopher repetition heuristic, the classifier, exact dedup, 2 workers.
#      Rerunning the same command after an interruption resumes it.
#   4. demo-score: precision/recall of each run's kept documents against the construction labels.
# Verification of the filtered data by annealing: runs/verify_demo.sh, then runs/ultraclean_loop.sh (the loop).
set -euo pipefail
OUT=${1:-runs/out/data_demo}
RUN=${MINICPM4:-python -m minicpm4.cli}
mkdir -p "$OUT"

$RUN data demo-corpus -o "$OUT"
for EPOCH in 3 25; do
  $RUN data train-classifier --pos "$OUT/seeds/pos.jsonl" --neg "$OUT/seeds/neg.jsonl" \
    -o "$OUT/model-e$EPOCH.bin" --bucket 200000 --epoch "$EPOCH"
  $RUN data filter "$OUT/corpus" -o "$OUT/filtered-e$EPOCH" --classifier "$OUT/model-e$EPOCH.bin" \
    --heuristic gopher_repetition --dedup exact --workers 2 2> "$OUT/filter-e$EPOCH.log"
  echo "epoch $EPOCH kept vs labels: $($RUN data demo-score "$OUT/filtered-e$EPOCH")"
done

if [[ -n "${SYNTH_URL:-}" ]]; then
  head -n 5 "$OUT/filtered-e25/kept/00000.jsonl" > "$OUT/synth-seeds.jsonl"
  $RUN data synth --track textbook --seeds "$OUT/synth-seeds.jsonl" -o "$OUT/textbook.jsonl" \
    --base-url "$SYNTH_URL" --concurrency 2 --max-tokens 256
fi

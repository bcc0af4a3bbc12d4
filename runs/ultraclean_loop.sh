#!/usr/bin/env bash
# The UltraClean iterative loop (paper, Fig. 3c) on the offline demo: seeds -> classifier -> filter -> verify the
# filtered output by annealing -> update the seeds, for ROUNDS rounds.
#
#   bash runs/verify_demo.sh OUT            # first: demo corpus, tokenizer, base checkpoint, default mix
#   bash runs/ultraclean_loop.sh OUT [ROUNDS]   # then the loop (default 2 rounds; ~3-4 min a round on 2 cores)
#
# Round r (in OUT/loop/rR/):
#   1. train-classifier on the round's seeds (round 1: the demo's seeds/pos.jsonl and seeds/neg.jsonl),
#      --epoch 25 and a 200k-row hash table (see runs/data_demo.sh for why);
#   2. filter the demo corpus with it (classifier + exact dedup);
#   3. data verify: anneal the base checkpoint on 30% kept/ + 70% default mix vs the default mix alone;
#   4. if the filtered output verified (held-out loss lower with a 95% interval below 0), the next round trains on
#      this round's predictions (kept/ as positives, rejected/quality/ as negatives) plus the previous seeds;
#      otherwise the loop stops and keeps the last verified classifier. OUT/loop/summary.jsonl gets one line a round.
set -euo pipefail
OUT=${1:-/tmp/minicpm4-verify-demo}
ROUNDS=${2:-2}
PY=${PYTHON:-python}
RUN="$PY -m minicpm4.cli"
BASE=$(ls -d "$OUT"/base/checkpoints/step_* | head -n 1)
POS=("$OUT/corpus/seeds/pos.jsonl")
NEG=("$OUT/corpus/seeds/neg.jsonl")
mkdir -p "$OUT/loop"
for R in $(seq 1 "$ROUNDS"); do
  D="$OUT/loop/r$R"
  mkdir -p "$D"
  [ -f "$D/model.bin" ] || $RUN data train-classifier $(printf -- "--pos %s " "${POS[@]}") \
    $(printf -- "--neg %s " "${NEG[@]}") -o "$D/model.bin" --bucket 200000 --epoch 25
  $RUN data filter "$OUT/corpus/corpus" -o "$D/filtered" --classifier "$D/model.bin" --dedup exact \
    2> "$D/filter.log" > "$D/filter.txt"
  echo "round $R kept vs labels: $($RUN data demo-score "$D/filtered")"
  $RUN data verify --base "$BASE" --candidate "$D/filtered/kept" --default-mix "$OUT/default.jsonl" \
    -o "$D/verify" --threads 1 --json > "$D/verify.json"
  VERIFIED=$("$PY" - "$D" "$R" "$OUT/loop/summary.jsonl" <<'PYEOF'
import json, sys
d, r, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = json.load(open(f"{d}/verify.json"))
loss = s["heldout_loss"]
ok = loss["ci95"] is not None and loss["ci95"][1] < 0
line = {"round": r, "heldout_loss_diff": loss["diff"], "ci95": loss["ci95"], "mc_accuracy_diff": s["mc_accuracy"]["diff"],
        "mc_margin_diff": s["mc_margin"]["diff"], "verified": ok}
open(log, "a").write(json.dumps(line) + "\n")
print(json.dumps(line), file=sys.stderr)
print("yes" if ok else "no")
PYEOF
)
  if [ "$VERIFIED" != yes ]; then
    echo "round $R: the filtered output did not verify; stopping (classifier of round $((R - 1)) kept)"
    break
  fi
  POS+=("$D/filtered/kept")
  NEG+=("$D/filtered/rejected/quality")
done

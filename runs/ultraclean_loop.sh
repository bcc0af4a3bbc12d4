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
#   3. data verify: anneal the base checkpoint on 30% kept/ + 70% default mix vs the default mix alone (the
#      baseline arms are those of the raw-corpus verification below, --baseline-from);
#   4. compare with the unfiltered corpus verified the same way once (OUT/loop/raw: the demo's good.jsonl +
#      bad.jsonl). All runs share the base, the default-mix split and the seeds, so their baseline arms are
#      identical and the candidate arms pair by seed. The default mix is KJV and the held-out text too, so any
#      off-domain candidate costs held-out loss against the baseline; the question a round asks is whether the
#      filtered output costs less than the raw corpus (kept - raw held-out loss with a 95% interval below 0).
#   5. if it verified, the next round trains on this round's predictions (kept/ as positives, rejected/quality/
#      as negatives) plus the previous seeds; otherwise the loop stops and keeps the last verified classifier.
#      OUT/loop/summary.jsonl gets one line a round.
set -euo pipefail
OUT=${1:-runs/out/verify_demo}
ROUNDS=${2:-2}
PY=${PYTHON:-python}
RUN="$PY -m minicpm4.cli"
BASE=$(ls -d "$OUT"/base/checkpoints/step_* | head -n 1)
POS=("$OUT/corpus/seeds/pos.jsonl")
NEG=("$OUT/corpus/seeds/neg.jsonl")
mkdir -p "$OUT/loop"
$RUN data verify --base "$BASE" --candidate "$OUT/good.jsonl" --candidate "$OUT/bad.jsonl" \
  --default-mix "$OUT/default.jsonl" -o "$OUT/loop/raw" --threads 1
for R in $(seq 1 "$ROUNDS"); do
  D="$OUT/loop/r$R"
  mkdir -p "$D"
  [ -f "$D/model.bin" ] || $RUN data train-classifier $(printf -- "--pos %s " "${POS[@]}") \
    $(printf -- "--neg %s " "${NEG[@]}") -o "$D/model.bin" --bucket 200000 --epoch 25
  $RUN data filter "$OUT/corpus/corpus" -o "$D/filtered" --classifier "$D/model.bin" --dedup exact \
    2> "$D/filter.log" > "$D/filter.txt"
  echo "round $R kept vs labels: $($RUN data demo-score "$D/filtered")"
  $RUN data verify --base "$BASE" --candidate "$D/filtered/kept" --default-mix "$OUT/default.jsonl" \
    -o "$D/verify" --threads 1 --baseline-from "$OUT/loop/raw"
  VERIFIED=$("$PY" - "$D" "$R" <<'PYEOF'
import json, sys
from minicpm4.data.verify_report import summarize
d, r = sys.argv[1], int(sys.argv[2])
raw, kept = (json.load(open(f"{p}/results.json"))["runs"] for p in (f"{d}/../raw", f"{d}/verify"))
vs_default = json.load(open(f"{d}/verify/results.json"))["summary"]
vs_raw = summarize({s: {"baseline": raw[s]["candidate"], "candidate": kept[s]["candidate"]} for s in kept if s in raw})
loss = vs_raw["heldout_loss"]
ok = loss["ci95"] is not None and loss["ci95"][1] < 0
line = {"round": r, "verified": ok, **{f"{m}_vs_raw": [e["diff"], e["ci95"]] for m, e in vs_raw.items()},
        **{f"{m}_vs_default": [e["diff"], e["ci95"]] for m, e in vs_default.items()}}
open(f"{d}/round.json", "w").write(json.dumps(line) + "\n")
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
cat "$OUT"/loop/r*/round.json > "$OUT/loop/summary.jsonl"

#!/usr/bin/env bash
# Verification by annealing on offline text: does a clean candidate help and a degraded one hurt?
#
#   bash runs/verify_demo.sh [OUT_DIR] [verify options...]   # default runs/out/verify_demo; a few min on 2 cores
#   PYTHON=... picks the interpreter; STEPS / SEEDS change the base run's length and the seeds.
#
# 1. demo-corpus (200 documents per clean source): its labelled corpus gives the two candidates,
#    good.jsonl (clean KJV / man-page / README prose) and bad.jsonl (boilerplate, word salad, web chrome,
#    OCR noise, spam).
# 2. KJV passages (12 verses) not in the demo corpus: 1200 for pretraining, 600 others as the default mix
#    (disjoint, so the held-out part of the default mix was never trained on); a 2048-token BPE on all of it.
# 3. pretrain a tiny muP model (2 layers, hidden 128) with WSD and stop at the end of the stable phase
#    (--stop-after), as the paper's probe anneals a stable-phase checkpoint; its decay_steps become the
#    annealing length.
# 4. data verify twice (good, bad): 30% candidate + 70% default mix vs default mix alone, 3 seeds, paired;
#    held-out loss on 10% of the default mix and a cloze multiple-choice eval built from it. The bad run reuses
#    the good run's baseline arms (--baseline-from), so the two candidates pair by seed against one baseline.
set -euo pipefail
OUT=${1:-runs/out/verify_demo}
shift || true
PY=${PYTHON:-python}
STEPS=${STEPS:-200}
SEEDS=${SEEDS:-3}
DECAY=$((STEPS / 5))
mkdir -p "$OUT"

[ -f "$OUT/corpus/seeds/pos.jsonl" ] || "$PY" -m minicpm4.cli data demo-corpus -o "$OUT/corpus" --per-source 200
[ -f "$OUT/tokenizer/tokenizer.json" ] || "$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
from minicpm4.data.demo_corpus import kjv_docs
from minicpm4.text.tokenizer import Tokenizer
out = Path(sys.argv[1])
rows = []
for part in sorted((out / "corpus" / "corpus").glob("part-*.jsonl")):
    for line in part.read_bytes().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the demo corpus plants a few unusable lines on purpose
            pass
rows = [r for r in rows if isinstance(r.get("text"), str) and r["text"].strip() and "label" in r]
seen = {r["text"] for r in rows} | {json.loads(l)["text"] for f in ("pos", "neg")
                                    for l in open(out / "corpus" / "seeds" / f"{f}.jsonl")}
kjv = [d for d in kjv_docs() if d not in seen]
splits = {"pretrain": kjv[0::2][:1200], "default": kjv[1::2][:600],
          "good": [r["text"] for r in rows if r["label"] == "pos"],
          "bad": [r["text"] for r in rows if r["label"] == "neg"]}
for name, docs in splits.items():
    (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    print(f"{name}: {len(docs)} documents", file=sys.stderr)
backend = Backend(models.BPE(unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
backend.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
backend.train_from_iterator([d for docs in splits.values() for d in docs], trainer)
Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "add_bos_token": True}).save(out / "tokenizer")
PYEOF
"$PY" -m minicpm4.cli data tokenize "$OUT/pretrain.jsonl" --tokenizer "$OUT/tokenizer" -o "$OUT/shards"
BASE="$OUT/base/checkpoints/step_$(printf %07d $((STEPS - DECAY)))"
[ -d "$BASE" ] || "$PY" -m minicpm4.cli train pretrain --set data="$OUT/shards" --set out_dir="$OUT/base" \
  --set model=tiny --set model_overrides.num_hidden_layers=2 --set model_overrides.hidden_size=128 \
  --set model_overrides.intermediate_size=256 --set seq_len=128 --set batch_size=16 --set micro_batch_size=16 \
  --set steps="$STEPS" --set warmup_steps=10 --set decay_steps="$DECAY" --set lr=0.03 --set threads=1 \
  --stop-after $((STEPS - DECAY))
"$PY" -m minicpm4.cli data verify --base "$BASE" --candidate "$OUT/good.jsonl" \
  --default-mix "$OUT/default.jsonl" -o "$OUT/verify-good" --seeds "$SEEDS" --threads 1 "$@"
"$PY" -m minicpm4.cli data verify --base "$BASE" --candidate "$OUT/bad.jsonl" --baseline-from "$OUT/verify-good" \
  --default-mix "$OUT/default.jsonl" -o "$OUT/verify-bad" --seeds "$SEEDS" --threads 1 "$@"
# The two candidates compare directly, paired by seed: bad - good (positive loss = the bad candidate costs more).
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from minicpm4.data.verify_report import summarize
good, bad = (json.load(open(f"{sys.argv[1]}/verify-{c}/results.json"))["runs"] for c in ("good", "bad"))
runs = {s: {"baseline": good[s]["candidate"], "candidate": bad[s]["candidate"]} for s in good if s in bad}
for metric, e in summarize(runs).items():
    print(f"bad - good {metric:<13} {e['diff']:+.4f} ± {e['se'] or 0:.4f}  95% CI [{e['ci95'][0]:+.4f}, "
          f"{e['ci95'][1]:+.4f}]" if e["ci95"] else "")
PYEOF

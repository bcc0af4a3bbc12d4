#!/usr/bin/env bash
# From nothing to a pretrained, long-context-extended and SFT'd tiny MiniCPM4 on the KJV text, on CPU: corpus +
# tokenizer, token shards, muP/WSD pretraining at seq 128, the long-context stage at seq 1024 (runs/long_context.sh:
# InfLLM v2 + LongRoPE + length buckets, planted-fact retrieval before/after), SFT on verse-completion chats, a check
# of the ChatML behaviour before and after SFT (replies that end with <|im_end|> within 48 tokens, and exact
# completions) on 50 held-out chats, and plots of every stage's loss curve and of the retrieval (runs/pipeline_plots.py).
#   bash runs/tiny_pipeline.sh [OUT]        (PYTHON=... picks the interpreter; see BENCHMARKS.md for the time taken)
set -euo pipefail
OUT=${1:-runs_out/tiny_pipeline}
PY=${PYTHON:-python}
mkdir -p "$OUT"
[ -f "$OUT/chat_train.jsonl" ] || "$PY" "$(dirname "$0")/kjv_corpus.py" "$OUT"
# pretraining text: the KJV books plus short planted-fact documents (runs/planted_facts.py --short, ~60 % of the
# tokens), so that the model learns to copy (an induction circuit) within 128 tokens before the long stage
[ -f "$OUT/short/train.jsonl" ] || "$PY" "$(dirname "$0")/planted_facts.py" data "$OUT" --short --tokens 1200000
"$PY" -m minicpm4.cli data tokenize "$OUT/text" "$OUT/short/train.jsonl" --tokenizer "$OUT/tokenizer" -o "$OUT/shards" \
  --workers 2
COMMON="--set seq_len=128 --set batch_size=16 --set micro_batch_size=16 --set threads=${THREADS:-2} --set save_every=100"
[ -f "$OUT/pre/checkpoints/latest" ] && RESUME=--resume || RESUME=
"$PY" -m minicpm4.cli train pretrain $COMMON $RESUME --set data="$OUT/shards" --set out_dir="$OUT/pre" \
  --set model=tiny --set model_overrides.num_hidden_layers=4 --set lr=0.02 --set steps=400 \
  --set warmup_steps=20 --set decay_steps=80
PRE="$OUT/pre/checkpoints/step_0000400/model"
PYTHON="$PY" bash "$(dirname "$0")/long_context.sh" "$OUT" "$PRE"
BASE="$OUT/long/run/checkpoints/$(printf 'step_%07d' "${LONG_STEPS:-120}")/model"
# SFT packs chats with a block-diagonal mask, which InfLLM v2 does not take: dense attention (as below dense_len)
[ -f "$OUT/sft/checkpoints/latest" ] && RESUME=--resume || RESUME=
"$PY" -m minicpm4.cli train sft $COMMON $RESUME --set data="$OUT/chat_train.jsonl" --set model="$BASE" \
  --set model_overrides.sparse_config=null --set out_dir="$OUT/sft" --set lr=0.01 --set steps=200 \
  --set warmup_steps=10 --set decay_steps=40
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
import minicpm4
out = Path(sys.argv[1])
chats = [json.loads(l)["messages"] for l in (out / "chat_test.jsonl").read_text().splitlines()]
report = {}
for name, path in (("pretrained", out / "pre/checkpoints/step_0000400/model"),
                   ("sft", out / "sft/checkpoints/step_0000200/model")):
    model, tok = minicpm4.load(path, dtype="fp32")
    llm = minicpm4.LLM(model, tok)
    params = minicpm4.SamplingParams(max_new_tokens=48, temperature=0.0)
    res = llm.generate_ids([llm.encode_chat(m[:1]) for m in chats], params)
    ended = sum(r.generation.finish_reason == "stop" for r in res)
    exact = sum(r.text.strip() == m[1]["content"] for r, m in zip(res, chats))
    report[name] = {"ends_with_im_end": ended / len(chats), "exact_completion": exact / len(chats),
                    "example": res[0].text[:120]}
print(json.dumps(report, indent=1))
(out / "chatml_check.json").write_text(json.dumps(report, indent=1))
PYEOF
"$PY" "$(dirname "$0")/pipeline_plots.py" "$OUT"

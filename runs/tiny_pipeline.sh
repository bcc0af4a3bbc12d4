#!/usr/bin/env bash
# From nothing to a pretrained, long-context-extended and SFT'd tiny MiniCPM4 on the KJV text, on CPU: corpus +
# tokenizer, token shards, WSD pretraining at seq 128, the long-context stage at seq 1024 (runs/long_context.sh:
# InfLLM v2 + LongRoPE + length buckets, planted-fact retrieval before/after), SFT on verse-completion chats, a check
# of the ChatML behaviour before and after SFT (replies that end with <|im_end|> within 48 tokens, and exact
# completions) on 50 held-out chats, and plots of every stage's loss curve and of the retrieval (runs/pipeline_plots.py).
#   bash runs/tiny_pipeline.sh [OUT]    PYTHON picks the interpreter, THREADS (2) torch threads, PRE_STEPS (8000) and
#                                       LONG_STEPS (100) the stages' steps, SEED (0) the training seed of every stage
#                                       (init and data order; the generated data stay the same); OUT/times.txt:
#                                       seconds per stage
# The model is the one that learns to copy on this budget (BENCHMARKS.md, issue 6): 2 layers, width 128, 4 heads x 32
# (no GQA), tied embeddings, standard parametrisation (mup=false, init 0.02, lr 1e-3, scale_emb 1); the 4-layer muP
# tiny model at lr 0.02 formed no copy (induction) circuit, without which the long stage has nothing to stretch.
set -euo pipefail
OUT=${1:-runs/out/tiny_pipeline}
PY=${PYTHON:-python}
HERE=$(dirname "$0")
PRE_STEPS=${PRE_STEPS:-8000}
export LONG_STEPS=${LONG_STEPS:-100}
mkdir -p "$OUT"
. "$(dirname "$0")/stage.sh"  # stage NAME CMD...
data() {
  [ -f "$OUT/chat_train.jsonl" ] || "$PY" "$HERE/kjv_corpus.py" "$OUT"
  # the stable phase's data: documents of <= 128 tokens, 80 % of them a random-word span said 2-3 times (every token
  # after the first copy is a copy target: the plainest signal for an induction circuit), the rest KJV text with
  # planted facts "The secret of Abner 4821." repeated at the end (runs/planted_facts.py --short)
  [ -f "$OUT/short/train.jsonl" ] || "$PY" "$HERE/planted_facts.py" data "$OUT" --short --repeats 0.8 --tokens 2000000
  "$PY" -m minicpm4.cli data tokenize "$OUT/short/train.jsonl" --tokenizer "$OUT/tokenizer" -o "$OUT/shards"
  # the decay phase mixes in plain KJV text (half of each batch), the language SFT's verse completion builds on
  "$PY" -m minicpm4.cli data tokenize "$OUT/text" --tokenizer "$OUT/tokenizer" -o "$OUT/kjv_shards"
}
COMMON="--set seq_len=128 --set batch_size=16 --set micro_batch_size=16 --set threads=${THREADS:-2} --set save_every=250
  --set seed=${SEED:-0}"
MODEL="--set model=tiny --set model_overrides.num_hidden_layers=2 --set model_overrides.num_attention_heads=4
  --set model_overrides.num_key_value_heads=4 --set model_overrides.head_dim=32 --set model_overrides.scale_emb=1
  --set model_overrides.tie_word_embeddings=true --set model_overrides.dim_model_base=128
  --set model_overrides.scale_depth=1.4142 --set mup=false --set init_std=0.02"
pretrain() {
  [ -f "$OUT/pre/checkpoints/latest" ] && RESUME=--resume || RESUME=
  "$PY" -m minicpm4.cli train pretrain $COMMON $MODEL $RESUME --set data="$OUT/shards" --set out_dir="$OUT/pre" \
    --set lr=0.001 --set steps="$PRE_STEPS" --set warmup_steps=20 --set decay_steps=$((PRE_STEPS / 5)) \
    --set decay_data="$OUT/kjv_shards" --set decay_mix=0.5
}
long() {
  PYTHON="$PY" bash "$HERE/long_context.sh" "$OUT" "$PRE" --set lr=0.001 --set mup=false --set seed="${SEED:-0}"
  # the copy probe: loss on a repeated 20-token KJV span vs on its first occurrence, 0 / 60 / 400 tokens apart (a
  # copy circuit: 2nd << 1st), before and after the long stage
  "$PY" "$HERE/planted_facts.py" probe "$OUT/kjv_shards" "$PRE" "$BASE" --threads "${THREADS:-2}" | tee "$OUT/probe.txt"
}
sft() {
  # SFT packs chats with a block-diagonal mask, which InfLLM v2 does not take: dense attention (as below dense_len)
  [ -f "$OUT/sft/checkpoints/latest" ] && RESUME=--resume || RESUME=
  "$PY" -m minicpm4.cli train sft $COMMON $RESUME --set data="$OUT/chat_train.jsonl" --set model="$BASE" \
    --set model_overrides.sparse_config=null --set out_dir="$OUT/sft" --set mup=false --set lr=0.003 --set steps=200 \
    --set warmup_steps=10 --set decay_steps=40
}
chatml_check() {  # greedy replies of the pretrained and the SFT'd model to the held-out chats
  "$PY" - "$OUT" "$PRE" "$SFT" <<'PYEOF'
import json, sys
from pathlib import Path
import minicpm4
out = Path(sys.argv[1])
chats = [json.loads(l)["messages"] for l in (out / "chat_test.jsonl").read_text().splitlines()]
report = {}
for name, path in (("pretrained", sys.argv[2]), ("sft", sys.argv[3])):
    model, tok = minicpm4.load(path, dtype="fp32")
    llm = minicpm4.LLM(model, tok)
    params = minicpm4.SamplingParams(max_new_tokens=48, temperature=0.0)
    res = llm.generate_ids([llm.encode_chat(m[:1]) for m in chats], params)
    last = [r.generation.token_ids[-1:] for r in res]  # a reply also stops at </s>, which is not the format
    ended = sum(ids == tok.encode("<|im_end|>") for ids in last)
    eos = sum(ids == [tok.eos_token_id] for ids in last)
    exact = sum(r.text.strip() == m[1]["content"] for r, m in zip(res, chats))
    report[name] = {"ends_with_im_end": ended / len(chats), "ends_with_eos": eos / len(chats),
                    "exact_completion": exact / len(chats), "example": res[0].text[:120]}
print(json.dumps(report, indent=1))
(out / "chatml_check.json").write_text(json.dumps(report, indent=1))
PYEOF
}
PRE="$OUT/pre/checkpoints/$(printf 'step_%07d' "$PRE_STEPS")/model"
BASE="$OUT/long/run/checkpoints/$(printf 'step_%07d' "$LONG_STEPS")/model"
SFT="$OUT/sft/checkpoints/step_0000200/model"
stage data data
stage pretrain pretrain
stage long long
stage sft sft
stage chatml chatml_check
stage plots "$PY" "$HERE/pipeline_plots.py" "$OUT"

#!/usr/bin/env bash
# RL with chunk-wise rollout at small scale, on CPU (issue 17): does GRPO raise the reward on held-out prompts, and
# what does chunk-wise rollout save against vanilla rollout on a task with long-tailed response lengths?
#
#   bash runs/rl_demo.sh [OUT]    # default runs/out/rl_demo; under an hour on a shared 2-core machine (BENCHMARKS.md)
#   PYTHON picks the interpreter (matplotlib for the plots: the `train` extra), THREADS (2) torch threads of the
#   SFT, SFT_STEPS (100) and RL_STEPS (12) the stages' steps, LR (5e-4) the RL learning rate, CHUNK (64)
#   rl.chunk_tokens, TASK (chain_small) the RL task (chain: two-digit numbers; bench_rl's policy in BENCHMARKS.md is
#   TASK=chain SFT_STEPS=200)
#
# 1. data: 20000 chats on chain_small tasks (train/rl/chain_tasks.py, small=True: arithmetic word problems with
#    one-digit numbers and power-law step counts, a worked answer of one line per step ending in \boxed{answer})
#    and a BPE of <= 512 ids with single-digit tokens (runs/rl_demo.py data). The held-out RL prompts' questions are
#    kept out (and out of the RL training prompts: objective.py).
# 2. SFT a tiny model from scratch on them (4 layers, width 128, ~1M parameters, standard parametrisation) for
#    SFT_STEPS steps. The default 135M model is ~100x the compute per token: at 2 cores it would run a handful of RL
#    steps in the budget. The tiny model learns the format (a line per operation, the box, <|im_end|>) and so the
#    task's long-tailed response lengths, which the rollout comparison needs, and solves a share of the short
#    problems (one-digit facts; it copies the question's numbers unreliably), so groups have mixed rewards.
# 3. three RL runs of RL_STEPS steps from the SFT checkpoint, the same seed (so the same prompts and per-sample
#    seeds) and everything else equal: chunk-wise rollout (rl.chunk_tokens = CHUNK), vanilla rollout
#    (chunk_tokens = max_len) and the control (chunk-wise, lr 1e-12: the config takes no 0, and Adam steps of
#    1e-12 leave fp32 weights unchanged); greedy reward on 64 held-out prompts at the start and every RL_STEPS / 4
#    steps (eval_reward), and the step's wall time, rollout time and idle decode slots in each metrics.jsonl.
#    The three run at once, one thread each, so a shared machine's changing load hits all three alike (their step
#    times are comparable with each other, not with a quiet machine's). Batches of 4 prompts x 8 responses;
#    dynamic sampling with at most 3 draws a step (then the batch is topped up with zero-advantage groups).
# 4. OUT/summary.json (runs/rl_demo.py summary) and the plots OUT/reward.png, OUT/step_time.png.
set -euo pipefail
OUT=${1:-runs/out/rl_demo}
PY=${PYTHON:-python}
HERE=$(dirname "$0")
THREADS=${THREADS:-2}
SFT_STEPS=${SFT_STEPS:-100}
RL_STEPS=${RL_STEPS:-12}
LR=${LR:-5e-4}
CHUNK=${CHUNK:-64}
MAX_LEN=512
TASK=${TASK:-chain_small}
mkdir -p "$OUT"
. "$(dirname "$0")/stage.sh"  # stage NAME CMD...
data() {
  [ -f "$OUT/sft.jsonl" ] || "$PY" "$HERE/rl_demo.py" data "$OUT" --task "$TASK"
}
sft() {
  [ -f "$OUT/sft/checkpoints/latest" ] && RESUME=--resume || RESUME=
  # eos: </s> and <|im_end|> (the ChatML turn end SFT teaches), so rollouts stop at the end of the reply
  "$PY" -m minicpm4.cli train sft $RESUME --set model=tiny --set tokenizer="$OUT/tokenizer" \
    --set data="$OUT/sft.jsonl" --set out_dir="$OUT/sft" --set seq_len=512 --set batch_size=16 \
    --set micro_batch_size=16 --set threads="$THREADS" --set mup=false --set init_std=0.02 --set lr=0.003 \
    --set steps="$SFT_STEPS" --set warmup_steps=10 --set decay_steps=$((SFT_STEPS / 5)) --set save_every=50 \
    --set print_every=10 --set model_overrides.num_hidden_layers=4 --set model_overrides.num_attention_heads=4 \
    --set model_overrides.num_key_value_heads=4 --set model_overrides.head_dim=32 \
    --set model_overrides.intermediate_size=512 --set model_overrides.scale_emb=1 \
    --set model_overrides.tie_word_embeddings=true --set model_overrides.dim_model_base=128 \
    --set model_overrides.scale_depth=1.4142 --set model_overrides.max_position_embeddings=1024 \
    --set "model_overrides.eos_token_id=[2,4]"
}
rl() {  # rl NAME CHUNK_TOKENS LR
  [ -f "$OUT/$1/checkpoints/latest" ] && RESUME=--resume || RESUME=
  "$PY" -m minicpm4.cli train rl $RESUME --set model="$SFT" --set out_dir="$OUT/$1" --set steps="$RL_STEPS" \
    --set lr="$3" --set mup=false --set threads=1 --set seed=0 --set batch_size=32 \
    --set micro_batch_size=8 --set save_every=3 --set eval_every=$((RL_STEPS / 4)) --set rl.eval_prompts=64 \
    --set rl.task=$TASK --set rl.group_size=8 --set rl.max_len=$MAX_LEN --set rl.chunk_tokens="$2" --set rl.ref_refresh=8 \
    --set rl.max_draws=3 > "$OUT/$1.log" 2>&1
}
rl_all() {
  rl chunk "$CHUNK" "$LR" & a=$!
  rl vanilla "$MAX_LEN" "$LR" & b=$!
  rl control "$CHUNK" 1e-12 & c=$!  # the config takes no lr 0; Adam steps of 1e-12 do not change fp32 weights of ~1e-2
  wait $a && wait $b && wait $c
}
SFT="$OUT/sft/checkpoints/$(printf 'step_%07d' "$SFT_STEPS")/model"
stage data data
stage sft sft
stage rl rl_all
stage summary "$PY" "$HERE/rl_demo.py" summary "$OUT"
stage plots "$PY" "$HERE/rl_demo.py" plots "$OUT"

